"""`WeightSync.bring_to_current` while a train step is in flight: the export queues behind the step on every
learner rank and carries the step's new weights, so the push must say that version, not the one asked for."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

from learner.group import LearnerGroup
from orchestrator.weight_sync import WeightSync
from orchestrator.weights.object_store import ObjectStoreWeights


def _actors(ray):
    @ray.remote(num_cpus=0)
    class Rank:
        """A learner rank reduced to its policy version: a step takes ``step_s`` and moves it on; an export
        returns the version its weights are at (rank 0's buckets)."""

        def __init__(self, version: int, step_s: float) -> None:
            self.version, self.step_s = version, step_s

        def train_step(self, batch, version: int) -> dict:
            time.sleep(self.step_s)
            self.version = version + 1
            return {}

        def export_weights(self, dtype: str, bucket_bytes: int) -> tuple[list[bytes], dict]:
            return [f"weights of version {self.version}".encode()], {}

    @ray.remote(num_cpus=0)
    class Worker:
        """A rollout worker that records each push: ``(label, what its buckets hold)``."""

        def __init__(self) -> None:
            self.got = []

        def receive_weights(self, version: int, buckets: list[bytes]) -> dict:
            self.got.append((version, buckets[0].decode()))
            return {"load_seconds": 0.0}

        def received(self) -> list:
            return self.got

    return Rank, Worker


class _Rollout:
    """`RolloutGroup`'s push entry point over one recording worker (a real one starts a vLLM engine)."""

    def __init__(self, worker) -> None:
        self.worker = worker

    def members(self) -> tuple:
        return ((0, 0),)

    def receive_weights_remote(self, slot: int, version: int, buckets_ref=None):
        return self.worker.receive_weights.remote(version, buckets_ref)


def test_a_worker_brought_to_current_mid_step_gets_the_weights_labelled_with_their_version(ray_local):
    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    Rank, Worker = _actors(ray)
    learner = object.__new__(LearnerGroup)  # the real group over stand-in ranks (its constructor starts DeepSpeed)
    learner.cfg, learner.ranks = SimpleNamespace(step_timeout_s=60), [Rank.remote(3, 2.0), Rank.remote(3, 2.0)]
    worker = Worker.remote()
    sync = WeightSync(ObjectStoreWeights(push_timeout_s=60), learner, _Rollout(worker), "bfloat16", "t", gpus=False)

    step = learner.train_step_remote(ray.put([]), 3)  # the driver is at version 3 until this step ends
    sync.bring_to_current(0, 3, "new rollout worker 0")  # e.g. a worker recovered during the step
    assert ray.get(worker.received.remote(), timeout=30) == [(4, "weights of version 4")]

    ray.get(step, timeout=30)  # the driver ends the step: version 4; the newest export is reused, as labelled
    sync.bring_to_current(0, 4, "recovered rollout worker 0")
    assert ray.get(worker.received.remote(), timeout=30)[-1] == (4, "weights of version 4")
