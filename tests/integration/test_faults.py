"""Faults injected on purpose into a real run: a rollout worker killed mid-run or hung, a reward function that
raises, non-finite gradients. Each run is bounded in time; none may hang or lose a prompt."""

from __future__ import annotations

import json
import math
import threading
import time
from types import SimpleNamespace

import pytest
import ray

from learner.worker import LearnerWorker
from orchestrator.loop import Trainer
from rollout.tasks import load_problems
from rollout.worker import RolloutWorker
from tiny_run import PacedLearner, tiny_run_config

pytestmark = pytest.mark.integration


def _cfg(model: str, tmp_path, *extra: str):
    return tiny_run_config(model, tmp_path, "buffer.max_staleness=1", "seed=2", *extra)


def _audit(summary: dict) -> None:
    parts = ("data/trained_groups", "data/groups_in_buffer", "data/groups_in_flight", "data/groups_filtered",
             "data/groups_dropped_stale")
    assert sum(summary[k] for k in parts) == summary["data/dispatched_groups"], summary


def _run_expecting(t: Trainer, error: type, match: str) -> None:
    """Run ``t``, which must stop with ``error`` matching ``match``; its actors are killed either way."""
    try:
        with pytest.raises(error, match=match):
            t.run(progress=False)
    finally:
        t.shutdown()


@pytest.mark.timeout(600)
def test_killed_rollout_worker_is_restarted_with_current_weights(tiny_sums_model, ray_local, tmp_path):
    cfg = _cfg(tiny_sums_model, tmp_path)
    t = Trainer(cfg, tmp_path / "run", tiny_sums_model, load_problems(cfg.data, "train"), [])
    killed = []

    def kill_when_busy():  # kill the (only) worker while a request is in flight, after the first step
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if t.version >= 1 and t.dispatcher.requests:
                ray.kill(t.rollout.workers[0], no_restart=False)
                killed.append(t.version)
                return
            time.sleep(0.05)

    th = threading.Thread(target=kill_when_busy, daemon=True)
    th.start()
    try:
        summary = t.run(progress=False)
        th.join(5)
        seq = list(range(5, 45))
        learner_lp = t.learner.sequence_logprobs(seq, 8)
        worker_lp = ray.get(t.rollout.workers[0].sequence_logprobs.remote(seq, 8, t.version), timeout=120)
    finally:
        t.shutdown()
    assert killed, "the worker was never killed"
    assert summary["rollout/worker_restarts"] >= 1 and summary["rollout/retried_groups"] >= 1, summary
    trained = [g for x in (tmp_path / "run" / "trained_groups.jsonl").read_text().splitlines()
               for g in json.loads(x)["groups"]]
    assert len(trained) == 3 * 4 and len(set(trained)) == len(trained)
    _audit(summary)
    # the restarted worker serves the current policy, not the base model it was rebuilt from
    assert max(abs(a - b) for a, b in zip(learner_lp, worker_lp)) < 1e-3


class FlakyReward(RolloutWorker):
    """Every 4th reward call raises."""

    calls = 0

    @staticmethod
    def reward_fn(text, reference):
        FlakyReward.calls += 1
        if FlakyReward.calls % 4 == 0:
            raise ValueError("unparsable")
        from rollout.rewards import score_response

        return score_response(text, reference)


@pytest.mark.timeout(600)
def test_reward_failures_are_counted_and_bounded(tiny_sums_model, ray_local, tmp_path):
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    cfg = _cfg(tiny_sums_model, tmp_path, "rollout.max_reward_failure_frac=0.5")
    t = Trainer(cfg, tmp_path / "ok", tiny_sums_model, load_problems(cfg.data, "train"), [],
                rollout_worker_cls=FlakyReward)
    try:
        summary = t.run(progress=False)
    finally:
        t.shutdown()
    assert summary["rollout/reward_failed_frac"] == pytest.approx(0.25, abs=0.02)
    cfg = _cfg(tiny_sums_model, tmp_path, "rollout.max_reward_failure_frac=0.1")
    t = Trainer(cfg, tmp_path / "stop", tiny_sums_model, load_problems(cfg.data, "train"), [],
                rollout_worker_cls=FlakyReward)
    _run_expecting(t, RuntimeError, r"failed their reward function .*max_reward_failure_frac = 0.1")


class NaNLearner(LearnerWorker):
    """Poisons the rewards of the steps listed in ``bad`` (NaN advantages -> non-finite gradients)."""

    bad = {1}

    def train_step(self, batch, version):
        if version in self.bad:
            for g in batch:
                for s in g:
                    s.reward = math.nan
        return super().train_step(batch, version)


class AlwaysNaN(NaNLearner):
    bad = {0, 1, 2, 3, 4}


@pytest.mark.timeout(600)
def test_non_finite_gradients_skip_the_step_and_repeated_ones_stop(tiny_sums_model, ray_local, tmp_path):
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    # bf16 + ZeRO-2: DeepSpeed checks gradients and skips the optimizer step
    cfg = _cfg(tiny_sums_model, tmp_path, "learner.dtype=bf16")
    t = Trainer(cfg, tmp_path / "skip", tiny_sums_model, load_problems(cfg.data, "train"), [],
                learner_worker_cls=NaNLearner)
    try:
        t.run(progress=False)
        ok = t.learner.sequence_logprobs(list(range(5, 30)), 8)
    finally:
        t.shutdown()
    recs = [json.loads(x) for x in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()][1:]
    assert [r["learner/skipped_steps"] for r in recs] == [0.0, 1.0, 0.0]
    assert all(math.isfinite(x) for x in ok)  # the weights stayed valid
    cfg = _cfg(tiny_sums_model, tmp_path, "learner.dtype=bf16", "learner.max_skipped_steps=2")
    t = Trainer(cfg, tmp_path / "stop", tiny_sums_model, load_problems(cfg.data, "train"), [],
                learner_worker_cls=AlwaysNaN)
    _run_expecting(t, RuntimeError, "2 consecutive optimizer steps had non-finite gradients")


@pytest.mark.timeout(600)
def test_dead_learner_rank_stops_the_run_naming_the_last_checkpoint(tiny_sums_model, ray_local, tmp_path):
    """With learner failover off (``max_failovers = 0``; tests/integration/test_learner_failover.py has it on)."""
    cfg = _cfg(tiny_sums_model, tmp_path, "num_steps=6", "learner.num_learners=2", "learner.num_cpus=0.5",
               "learner.micro_batch_size=4", "checkpoint.every=1", "checkpoint.keep=1", "learner.max_failovers=0")
    run_dir = tmp_path / "dead"
    t = Trainer(cfg, run_dir, tiny_sums_model, load_problems(cfg.data, "train"), [])

    def kill_rank_1():  # mid-run, once a checkpoint exists
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list(run_dir.glob("checkpoints/step_*/COMPLETE")):
            time.sleep(0.05)
        ray.kill(t.learner.ranks[1])

    th = threading.Thread(target=kill_rank_1, daemon=True)
    th.start()
    t0 = time.monotonic()
    _run_expecting(t, RuntimeError, r"learner rank 1 died .* Last complete checkpoint: .*step_00000\d")
    assert time.monotonic() - t0 < 240  # an error, not a wait for the collective timeout


@ray.remote(num_cpus=0)
class _Rank:
    def call(self, fail: bool):
        if fail:
            raise RuntimeError("Connection reset by peer")  # what a peer's collective reports
        return "ok"


def test_a_dead_rank_is_named_over_its_peers_errors(ray_local):
    """A rank that died while its peer waited in a collective: the peer's error comes first in rank
    order, yet the group names the dead rank (the cause), whatever the call (here a checkpoint write)."""
    from learner.group import LearnerGroup, LearnerRankDied

    ranks = [_Rank.remote(), _Rank.remote()]
    ray.get([r.call.remote(False) for r in ranks], timeout=60)
    ray.kill(ranks[1])
    group = object.__new__(LearnerGroup)
    group.cfg, group.ranks = SimpleNamespace(step_timeout_s=60), ranks
    with pytest.raises(LearnerRankDied, match=r"learner rank 1 died during save_checkpoint \(\w*Actor\w*Error\)"):
        group._get([ranks[0].call.remote(True), ranks[1].call.remote(False)], "save_checkpoint")
    fresh = object.__new__(LearnerGroup)  # that group failed for good (a survivor still in the call is stopped)
    fresh.cfg, fresh.ranks = group.cfg, [_Rank.remote()]
    with pytest.raises(RuntimeError, match="Connection reset"):  # no rank died: the error itself
        fresh._get([fresh.ranks[0].call.remote(True)], "save_checkpoint")


class DiesOnceAfterTheFirstPush(RolloutWorker):
    """Exits (a crash) at the start of its first request served with pushed weights; ``marker`` is a file
    that survives the restart, so it dies only once."""

    marker = ""

    def generate(self, req):
        import os

        if self.version >= 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        return super().generate(req)


@pytest.mark.timeout(600)
def test_collective_weight_group_is_rebuilt_for_a_restarted_worker(tiny_sums_model, ray_local, tmp_path):
    """A restarted worker keeps its slot but lost its end of the weight group: the next push must build a
    new group (no broadcast that waits out its timeout, no fallback to the object store)."""
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    DiesOnceAfterTheFirstPush.marker = str(tmp_path / "died")
    cfg = _cfg(tiny_sums_model, tmp_path, "num_steps=4", "weights.type=collective",
               "weights.push_timeout_s=40", "rollout.weight_wait_timeout_s=40")
    t = Trainer(cfg, tmp_path / "run", tiny_sums_model, load_problems(cfg.data, "train"), [],
                learner_worker_cls=PacedLearner, rollout_worker_cls=DiesOnceAfterTheFirstPush)
    try:
        summary = t.run(progress=False)
        generations = t.weight_sync.transport.generation
    finally:
        t.shutdown()
    assert (tmp_path / "died").exists() and summary["rollout/worker_restarts"] >= 1, summary
    assert summary["weights/push_fallbacks_total"] == 0, summary
    assert generations == 2  # one group at the start, one rebuilt for the restarted worker
    _audit(summary)


class BreaksMidBroadcast(RolloutWorker):
    """Rollout worker 1 breaks in the middle of receiving its second weight broadcast: it receives the
    header, writes the time to ``marker``, then dies (``os._exit``: a lost peer) or hangs (never reads the
    rest). Once per test (``marker`` survives a restart)."""

    marker, mode = "", "dies"

    def receive_weights(self, version, buckets=None):
        import os

        import torch
        from torch._C._distributed_c10d import BroadcastOptions

        self.calls = getattr(self, "calls", 0) + 1
        if buckets is not None or self.index != 1 or self.calls < 2 or os.path.exists(self.marker):
            return super().receive_weights(version, buckets)
        self.weight_group.pg.broadcast([torch.zeros(2, dtype=torch.int64)], BroadcastOptions()).wait()
        with open(self.marker, "w") as f:
            f.write(str(time.time()))
        if self.mode == "dies":
            os._exit(1)
        time.sleep(3600)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", ["dies", "hangs"])
def test_broken_broadcast_falls_back_and_learner_rank_0_keeps_training(tiny_sums_model, ray_local, tmp_path,
                                                                      caplog, mode):
    """A rollout worker dies or hangs in the middle of a gloo weight broadcast: the driver hears of it within
    ``weights.push_timeout_s``, the push falls back to the object store, learner rank 0 (the sender) lives on
    and trains, the next push builds a new group and broadcasts again, and every worker ends on the
    learner's final policy."""
    import logging
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    BreaksMidBroadcast.marker, BreaksMidBroadcast.mode = str(tmp_path / "broke"), mode
    timeout_s = 20
    cfg = _cfg(tiny_sums_model, tmp_path, "num_steps=5", "weights.type=collective",
               "rollout.num_workers=2", "rollout.num_cpus=1", "learner.num_cpus=1",
               f"weights.push_timeout_s={timeout_s}", f"rollout.weight_wait_timeout_s={timeout_s}")
    t = Trainer(cfg, tmp_path / "run", tiny_sums_model, load_problems(cfg.data, "train"), [],
                rollout_worker_cls=BreaksMidBroadcast)
    caplog.set_level(logging.WARNING, logger="orchestrator.weight_sync")
    try:
        summary = t.run(progress=False)
        rank0_alive = ray.get(t.learner.ranks[0].master_address.remote(), timeout=30)  # the same actor answers
        generations = t.weight_sync.transport.generation
        seq = list(range(5, 45))
        learner_lp = t.learner.sequence_logprobs(seq, 8)
        worker_lp = ray.get([w.sequence_logprobs.remote(seq, 8, 5) for w in t.rollout.workers], timeout=120)
    finally:
        t.shutdown()
    assert rank0_alive
    broke_at = float((tmp_path / "broke").read_text())
    fell_back = [r for r in caplog.records if "object store" in r.getMessage()]
    assert fell_back, "no fallback to the object store was logged"
    assert fell_back[0].created - broke_at < timeout_s + 10, fell_back[0].created - broke_at
    assert summary["weights/push_fallbacks_total"] >= 1 and summary["policy/version"] == 5, summary
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert recs[-1]["weights/broadcast_seconds"] > 0  # the last push was a broadcast again, from the same rank 0
    assert generations >= 2  # the broken group was replaced
    for lp in worker_lp:  # both workers serve the learner's final policy
        assert max(abs(a - b) for a, b in zip(learner_lp, lp)) < 1e-3
    _audit(summary)


class HangsOnce(RolloutWorker):
    """Worker 1's first request never finishes (a hung engine call); every other request is served normally.
    Once per test: ``marker`` survives the restart, so the new worker in the slot does not hang."""

    marker = ""

    def generate(self, req):
        import os

        if self.index == 1 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(3600)
        return super().generate(req)


@pytest.mark.timeout(600)
def test_one_hung_request_restarts_its_worker_and_the_run_goes_on(tiny_sums_model, ray_local, tmp_path, caplog):
    """A request past rollout.request_timeout_s: its worker is restarted (counted), its groups re-issued, the other
    worker goes on, and the run trains every step with no group lost or trained twice."""
    import logging
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    HangsOnce.marker = str(tmp_path / "hung")
    cfg = _cfg(tiny_sums_model, tmp_path, "rollout.num_workers=2", "rollout.request_timeout_s=6",
               "learner.num_cpus=0.5", "rollout.num_cpus=1")
    t = Trainer(cfg, tmp_path / "run", tiny_sums_model, load_problems(cfg.data, "train"), [],
                rollout_worker_cls=HangsOnce)
    caplog.set_level(logging.WARNING, logger="orchestrator.dispatch")
    t0 = time.monotonic()
    try:
        summary = t.run(progress=False)
    finally:
        t.shutdown()
    assert time.monotonic() - t0 < 200
    hung = [r.getMessage() for r in caplog.records if " hung: " in r.getMessage()]
    assert hung and hung[0].startswith("rollout worker 1 hung: generate request g") \
        and "rollout.request_timeout_s = 6 s" in hung[0], hung
    assert summary["rollout/worker_restarts_hung"] >= 1 and summary["rollout/worker_restarts"] >= 1, summary
    assert summary["rollout/retried_groups"] >= 2, summary  # the hung request's 2 groups were re-issued
    trained = [g for x in (tmp_path / "run" / "trained_groups.jsonl").read_text().splitlines()
               for g in json.loads(x)["groups"]]
    assert len(trained) == 3 * 4 and len(set(trained)) == len(trained)  # nothing lost, nothing trained twice
    _audit(summary)


@ray.remote(num_cpus=0)
class _HungEnvWorker:
    """Refuses a request as a rollout worker holding too many hung environment calls does."""

    def generate(self, req):
        from rollout.episode import HungWorkerError

        raise HungWorkerError("environment 'x': 2 reset/step calls abandoned after rollout.env.step_timeout_s = 1 s "
                              "still run in this worker (more than rollout.env.max_hung_steps = 1)")


def test_a_worker_refusing_a_request_for_hung_env_calls_is_restarted(ray_local):
    """`rollout.episode.HungWorkerError` raised in a worker process reaches the driver's `Dispatcher.collect` through
    Ray, which counts it and hands the request to the restart path (`Dispatcher.restart_hung`: replace the worker,
    re-issue the request; that path runs for real in the test above) instead of stopping the run; one more hang
    than ``rollout.max_restarts`` allows stops it naming the worker and the cause."""
    from buffer import GenerateRequest, Problem
    from orchestrator.dispatch import Dispatcher, InFlight
    from orchestrator.tally import RolloutTally

    actor = _HungEnvWorker.remote()
    rollout = SimpleNamespace(incarnation={0: 0}, done=lambda slot: None)
    staleness = SimpleNamespace(returned=lambda n: None, version=0, ready=0)
    cfg = SimpleNamespace(rollout=SimpleNamespace(max_restarts=1), buffer=SimpleNamespace(dynamic_sampling=False),
                          prompts_per_step=4)
    d = Dispatcher(cfg, rollout, None, staleness, RolloutTally(0.1), None, None, None)
    restarted = []

    def recover(f, err, replace=False):  # stands in for a new actor in the slot (tested with a Trainer above)
        restarted.append((f.worker, replace, str(err)))
        rollout.incarnation[f.worker] += 1
    d._recover = recover
    req = GenerateRequest((Problem("train/0", "1 + 1", "2"),), ("g0",), (4,), 0, 0)
    d.requests[actor.generate.remote(req)] = InFlight(req, 0, 0, time.monotonic())
    ray.wait(list(d.requests), timeout=60)
    d.collect()  # restarted, not raised
    d.requests[actor.generate.remote(req)] = InFlight(req, 0, 1, time.monotonic())  # the new worker hangs too
    ray.wait(list(d.requests), timeout=60)
    with pytest.raises(RuntimeError, match=r"^rollout worker 0 hung: environment 'x': 2 reset/step calls "
                                           r".*max_hung_steps = 1\) \(it was restarted for hangs 1 times"):
        d.collect()
    assert restarted == [(0, True, restarted[0][2])] and "max_hung_steps = 1" in restarted[0][2]
    assert d.tally.worker_restarts_hung == 1 and not d.requests


class FailsToLoadVersion2(RolloutWorker):
    def receive_weights(self, version, buckets=None):
        if version == 2:
            raise ValueError("corrupt bucket")
        return super().receive_weights(version, buckets)


@pytest.mark.timeout(600)
def test_a_failed_weight_push_stops_the_run_naming_worker_and_version(tiny_sums_model, ray_local, tmp_path):
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker class is defined here
    cfg = _cfg(tiny_sums_model, tmp_path, "num_steps=4", "weights.push_timeout_s=60",
               "rollout.weight_wait_timeout_s=60")
    t = Trainer(cfg, tmp_path / "run", tiny_sums_model, load_problems(cfg.data, "train"), [],
                rollout_worker_cls=FailsToLoadVersion2)
    _run_expecting(t, RuntimeError, r"rollout worker 0 failed to load the weights of policy version 2")
