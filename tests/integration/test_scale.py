"""Scaling rollout workers up and down while a run goes on: through `relayrl scale` and the run's
named control actor. Nothing may be lost, the staleness bound must hold, and a new worker must
serve the current weights."""

from __future__ import annotations

import json
import threading
import time

import pytest
import ray

from base import storage
from orchestrator.cli import main
from orchestrator.loop import Trainer
from rollout.tasks import load_problems
from tiny_run import PacedLearner, tiny_run_config

pytestmark = pytest.mark.integration


@pytest.mark.timeout(900)
def test_scale_up_then_down_during_a_run(tiny_sums_model, ray_local, tmp_path):
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    cfg = tiny_run_config(tiny_sums_model, tmp_path, "num_steps=8", "buffer.max_staleness=1", "seed=4")
    run_dir = tmp_path / "scaled"
    t = Trainer(cfg, run_dir, tiny_sums_model, load_problems(cfg.data, "train"), [],
                learner_worker_cls=PacedLearner)
    events, errors = [], []

    def operator():  # what a user does from another shell
        try:
            deadline = time.monotonic() + 600
            while t.version < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert main(["scale", str(run_dir), "--rollout-workers", "2"]) == 0
            events.append(("up", t.version))
            while (len(t.rollout.active) < 2 or t.version < 3) and time.monotonic() < deadline:
                time.sleep(0.1)
            # the new worker was brought to the current policy before it took prompts
            events.append(("new_worker_version", ray.get(t.rollout.slots[1].get_version.remote(), timeout=60)))
            assert main(["scale", run_dir.name, "--rollout-workers", "1"]) == 0
            events.append(("down", t.version))
        except Exception as e:  # surfaced in the test thread below
            errors.append(e)

    th = threading.Thread(target=operator, daemon=True)
    th.start()
    try:
        summary = t.run(progress=False)
        th.join(60)
        final_active = t.rollout.active
    finally:
        t.shutdown()
    assert not errors, errors
    assert [e[0] for e in events] == ["up", "new_worker_version", "down"], events
    assert events[1][1] >= 1  # not the base model (version 0)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    counts = [r["rollout/num_workers"] for r in recs]
    assert 2.0 in counts and counts[-1] == 1.0 and final_active == [0], counts
    assert any(r.get("rollout/worker_1_samples_per_s", 0) > 0 for r in recs)  # the new worker served
    # admission control alone kept the bound: the buffer's backstop never had to drop a group
    assert all(r["staleness/dropped_groups_total"] == 0 and r["off_policy/dropped_samples"] == 0 for r in recs)
    trained = [g for x in (run_dir / "trained_groups.jsonl").read_text().splitlines() for g in json.loads(x)["groups"]]
    assert len(trained) == 8 * 4 and len(set(trained)) == len(trained)
    parts = ("data/trained_groups", "data/groups_in_buffer", "data/groups_in_flight", "data/groups_filtered",
             "data/groups_dropped_stale")
    assert sum(summary[k] for k in parts) == summary["data/dispatched_groups"]


def test_scale_of_unknown_run_is_a_clear_error(ray_local, capsys):
    assert main(["scale", "no-such-run", "--rollout-workers", "2"]) == 2
    assert "no running relayrl job named 'no-such-run'" in capsys.readouterr().err


def test_scale_finds_a_run_on_s3_by_its_uri(ray_local, s3_bucket, capsys):
    from orchestrator.control import start_control

    run = storage.join(s3_bucket, "runs", "onbucket-20261202-000000")  # the control actor: the run dir's name
    ctl = start_control(storage.basename(run), 1)
    try:
        assert main(["scale", run, "--rollout-workers", "3"]) == 0
        assert json.loads(capsys.readouterr().out)["desired_rollout_workers"] == 3
        assert ray.get(ctl.desired.remote(), timeout=30) == 3
    finally:
        ray.kill(ctl)


def test_scale_of_a_uri_without_a_running_job_says_what_is_there(ray_local, s3_finished_run, s3_bucket, capsys):
    finished = s3_finished_run  # a run dir with summary.json
    assert main(["scale", finished, "--rollout-workers", "2"]) == 2
    assert f"the run at {finished!r} has finished (it has a summary.json)" in capsys.readouterr().err
    missing = storage.join(s3_bucket, "runs", "nothing-20260101-000000")
    assert main(["scale", missing, "--rollout-workers", "2"]) == 2
    err = capsys.readouterr().err
    assert f"no relayrl run at {missing!r} (no config.json there): pass the run dir or URI" in err, err


class SlowGeneration(__import__("rollout.worker", fromlist=["RolloutWorker"]).RolloutWorker):
    """Generation of 2 s per request: the learner waits on data."""

    def generate(self, *args, **kwargs):
        time.sleep(2.0)
        return super().generate(*args, **kwargs)


@pytest.mark.timeout(900)
def test_autoscale_adds_a_worker_while_the_learner_waits(tiny_sums_model, ray_local, tmp_path):
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    cfg = tiny_run_config(tiny_sums_model, tmp_path, "num_steps=5", "buffer.max_staleness=1", "seed=4",
                          "rollout.autoscale_max_workers=2", "rollout.autoscale_patience=1",
                          "rollout.autoscale_wait_frac=0.3")
    run_dir = tmp_path / "auto"
    t = Trainer(cfg, run_dir, tiny_sums_model, load_problems(cfg.data, "train"), [], rollout_worker_cls=SlowGeneration)
    try:
        t.run(progress=False)
    finally:
        t.shutdown()
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    waits = [round(r["perf/learner_wait_frac"], 2) for r in recs]
    counts = [r["rollout/num_workers"] for r in recs]
    print("learner wait fraction per step:", waits, "rollout workers:", counts)
    assert waits[0] > 0.3 and counts[0] == 1.0  # the first step waited on generation ...
    assert max(counts) == 2.0  # ... so a second worker was added, and never more than the maximum
    assert all(r["staleness/dropped_groups_total"] == 0 and r["off_policy/dropped_samples"] == 0 for r in recs)
