"""Verified weight pushes in a real run (a vLLM worker, a DeepSpeed learner, the tiny model): the worker's first
push is damaged after it was sealed (a flipped byte: its checksum fails, nothing loads, it is pushed again), and
it loads the re-push wrong although the checksum passes (its canary fails a second time in a row: it is replaced).
The run finishes, the counters say so, and the new worker serves the learner's final policy."""

from __future__ import annotations

import json
import os
import sys

import pytest
import ray

from orchestrator.loop import Trainer
from rollout.tasks import load_problems
from rollout.worker import RolloutWorker
from tiny_run import tiny_run_config

pytestmark = pytest.mark.integration


class FaultyPushes(RolloutWorker):
    """The first actor (``marker`` absent when it starts) flips one byte of the first push it receives (after the
    learner sealed it), then loads every later push with its norm weights scaled by -3, re-sealed so that the
    checksum passes. Its replacement finds ``marker`` and loads what it gets."""

    marker = ""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.faulty = not os.path.exists(self.marker)
        self.pushes_seen = 0
        open(self.marker, "a").close()

    def receive_weights(self, version, buckets=None):
        from base.weight_buckets import iter_buckets, serialize_buckets

        self.pushes_seen += 1
        if self.faulty and self.pushes_seen == 1:
            bad = bytearray(buckets[0])
            bad[-3] ^= 0xFF  # tensor bytes
            buckets = [bytes(bad), *buckets[1:]]
        elif self.faulty:
            buckets = serialize_buckets(((n, t * -3 if "norm" in n else t) for n, t in iter_buckets(buckets)), 1 << 30)
        return super().receive_weights(version, buckets)


@pytest.mark.timeout(600)
def test_a_damaged_then_a_wrong_push_are_pushed_again_then_the_worker_is_replaced(tiny_sums_model, ray_local,
                                                                                   tmp_path):
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    FaultyPushes.marker = str(tmp_path / "started")
    cfg = tiny_run_config(tiny_sums_model, tmp_path, "num_steps=2", "seed=2", "weights.push_timeout_s=60",
                          "rollout.weight_wait_timeout_s=60")
    t = Trainer(cfg, tmp_path / "run", tiny_sums_model, load_problems(cfg.data, "train"), [],
                rollout_worker_cls=FaultyPushes)
    try:
        summary = t.run(progress=False)
        sync, incarnation = t.weight_sync, t.rollout.incarnation[0]
        seq = list(range(5, 45))
        learner_lp = t.learner.sequence_logprobs(seq, 8)
        worker_lp = ray.get(t.rollout.workers[0].sequence_logprobs.remote(seq, 8, 2), timeout=120)
    finally:
        t.shutdown()
    assert summary["policy/version"] == 2, summary
    # the damaged push (checksum) and the wrong one (canary): one re-push, then a new actor in the slot
    assert (summary["weights/verify_failures_total"], summary["weights/repushes_total"],
            summary["weights/verify_replaced_total"]) == (2.0, 1.0, 1.0), summary
    assert incarnation == 1 and not sync.failures  # the replacement passed its check
    assert summary["weights/verified_total"] >= 1, summary
    # the summary's canary seconds are the run's: every step record's share, and the checks after the last step
    per_step = [json.loads(x).get("weights/verify_seconds", 0.0) for x in
                (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["weights/verify_seconds"] >= sum(per_step) and summary["weights/verify_seconds"] > 0, summary
    # the replacement serves the learner's final policy (it was checked against the learner's logprobs, too)
    assert max(abs(a - b) for a, b in zip(learner_lp, worker_lp)) < 1e-3
