"""A learner rank dies mid-run (a crash inside a training step): the ranks are replaced and restored from their
in-memory snapshots, under ZeRO-2 and ZeRO-3; where the snapshot store died with the rank, the run goes on from its
last checkpoint by itself. Either way the run finishes all its steps, trains again at most one step per failover,
restores exactly the weights it had (the learner's logprobs of a fixed sequence before and after), and trains every
dispatched group once."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import ray

from learner.worker import LearnerWorker
from orchestrator.loop import Trainer, train
from rollout.tasks import load_problems
from tiny_run import tiny_run_config

pytestmark = pytest.mark.integration

FIXED = [1, 5, 9, 13, 17, 21, 25, 29]  # token ids the learner scores after every step and every restore


class DiesInAStep(LearnerWorker):
    """Rank 1 crashes (``os._exit``) at the start of its step from each version in ``die_at`` (once: a marker file in
    ``dir``), killing the snapshot store first where ``die_at[version]`` is true. Rank 0 writes its logprobs of
    ``FIXED`` after every step (``step-<v>.json``, ``step-<v>.again.json`` when it exists) and after every snapshot
    restore (``restore-<v>.json``) into ``dir``. Ray pickles this module by value (see conftest)."""

    dir = ""
    die_at: dict[int, bool] = {}

    def train_step(self, batch, version):
        marker = os.path.join(self.dir, f"died-{version}")
        if self.rank == 1 and version in self.die_at and not os.path.exists(marker):
            open(marker, "w").close()
            if self.die_at[version]:
                ray.kill(self._store)
            os._exit(1)
        out = super().train_step(batch, version)
        self._fingerprint("step", version + 1)
        return out

    def snapshot(self, store, version, timeout_s):
        self._store = store
        return super().snapshot(store, version, timeout_s)

    def restore_snapshot(self, store, version, timeout_s):
        super().restore_snapshot(store, version, timeout_s)
        self._fingerprint("restore", version)
        return True

    def _fingerprint(self, event: str, version: int) -> None:
        lp = self.sequence_logprobs(FIXED, 1)  # every rank runs the forward (ZeRO-3 gathers)
        if self.rank == 0:
            path = Path(self.dir, f"{event}-{version}.json")
            if path.exists():
                path = path.with_suffix(".again.json")
            path.write_text(json.dumps(lp))


def _cfg(model: str, tmp_path, zero: int, *extra: str):
    return tiny_run_config(model, tmp_path, "buffer.max_staleness=1", "seed=2", "num_steps=6", "learner.num_learners=2",
                           "learner.num_cpus=0.5", "learner.micro_batch_size=4", f"learner.zero_stage={zero}", *extra)


def _learner(tmp_path: Path, die_at: dict[int, bool]) -> type:
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors cannot import this test module
    marks = tmp_path / "marks"
    marks.mkdir()
    return type("DiesInAStepHere", (DiesInAStep,), {"dir": str(marks), "die_at": die_at})


def _check_trained_once(run: Path, summary: dict, steps: int) -> None:
    rows = [json.loads(x) for x in (run / "trained_groups.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    trained = [g for r in rows for g in r["groups"]]
    assert len(trained) == len(set(trained)) == summary["data/trained_groups"]
    parts = ("data/trained_groups", "data/groups_in_buffer", "data/groups_in_flight", "data/groups_filtered",
             "data/groups_dropped_stale")
    assert sum(summary[k] for k in parts) == summary["data/dispatched_groups"], summary


def _restored_exactly(marks: Path) -> list[int]:
    """Versions restored from a snapshot; each restore's logprobs equal those after the step that made the version,
    and a step a snapshot failover trained again (on its kept batch) gives the logprobs it gave the first time. (A
    step trained again after a checkpoint resume may take another batch: not compared.)"""
    restored = sorted(int(p.stem.split("-")[1]) for p in marks.glob("restore-*.json"))
    for v in restored:
        before = json.loads((marks / f"step-{v}.json").read_text())
        assert json.loads((marks / f"restore-{v}.json").read_text()) == pytest.approx(before, abs=1e-6), v
        again = marks / f"step-{v + 1}.again.json"
        if again.exists():
            first = json.loads((marks / f"step-{v + 1}.json").read_text())
            assert json.loads(again.read_text()) == pytest.approx(first, abs=1e-5), again.name
    return restored


@pytest.mark.timeout(600)
def test_a_rank_dying_in_a_zero2_step_is_replaced_from_the_snapshot_losing_at_most_one_step(
        tiny_sums_model, ray_local, tmp_path):
    cfg = _cfg(tiny_sums_model, tmp_path, 2)
    cls = _learner(tmp_path, {3: False})
    run = tmp_path / "run"
    t = Trainer(cfg, run, tiny_sums_model, load_problems(cfg.data, "train"), [], learner_worker_cls=cls)
    try:
        summary = t.run(progress=False)
    finally:
        t.shutdown()
    assert t.version == 6 and summary["learner/failovers_total"] == 1
    assert summary["learner/failover_retrained_steps_total"] <= 1
    assert summary["weights/verify_failures_total"] == 0  # every worker serves what the new ranks pushed
    assert _restored_exactly(tmp_path / "marks") in ([2], [3])
    _check_trained_once(run, summary, 6)


@pytest.mark.timeout(600)
def test_zero3_fails_over_from_the_snapshot_then_from_the_checkpoint_when_the_store_dies_too(
        tiny_sums_model, ray_local, tmp_path):
    cfg = _cfg(tiny_sums_model, tmp_path, 3, "checkpoint.every=2", "checkpoint.keep=1")
    cls = _learner(tmp_path, {2: False, 5: True})
    run = tmp_path / "run"
    summary = train(cfg, run, tiny_sums_model, load_problems(cfg.data, "train"), [], progress=False,
                    learner_worker_cls=cls)
    assert summary["policy/version"] == 6 and summary["learner/failovers_total"] == 2
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["resume/step"] for r in records if "resume/step" in r] == [4.0]  # the checkpoint of step 4
    assert _restored_exactly(tmp_path / "marks") in ([1], [2])
    _check_trained_once(run, summary, 6)
