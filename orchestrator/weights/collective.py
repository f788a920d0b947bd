"""``weights.type = "collective"``: learner rank 0 broadcasts the buckets over a weight group of itself
and every rollout worker (`base.weight_group.WeightGroup`: gloo on CPU, NCCL on GPU), one copy on the
wire per push instead of one object-store fetch per worker.

The group's membership is fixed, so it is rebuilt (a new generation, a new name) whenever a worker
comes, goes or restarts; `orchestrator.weight_sync.WeightSync` falls back to the object store when a
broadcast fails.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from orchestrator.remote import wait_all
from orchestrator.weights.base import Members, WeightsConfigBase, WeightTransport

logger = logging.getLogger(__name__)


class CollectiveWeights(WeightsConfigBase):
    """Weights broadcast from learner rank 0 over a collective group."""

    type: Literal["collective"] = Field("collective", description="broadcast from learner rank 0 over a "
                                        "collective group of rank 0 and the rollout workers")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="collective backend; auto: nccl when learner and rollout workers have GPUs, else gloo")


class CollectiveTransport(WeightTransport):
    """Broadcast from learner rank 0 over a weight group of rank 0 and every rollout worker."""

    type = "collective"
    config = CollectiveWeights
    fixed_membership = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        backend = self.cfg.backend
        self.backend = ("nccl" if self.gpus else "gloo") if backend == "auto" else backend
        self.generation = 0  # weight groups built so far

    def setup(self, members: Members) -> None:
        """Build weight group generation ``generation + 1``: learner rank 0 is group rank 0 (the source),
        the workers of ``members`` ranks 1..N.

        Raises:
            TimeoutError: not every member joined within ``push_timeout_s``.
        """
        addr, port = self.learner.master_address()
        name, world, timeout = f"{self.name}/weights/{self.generation + 1}", len(members) + 1, self.cfg.push_timeout_s
        refs = self.learner.join_weight_group_remote(self.backend, addr, port, world, timeout, name)
        refs += [self.rollout.join_weight_group_remote(slot, self.backend, addr, port, i + 1, world, timeout, name)
                 for i, (slot, _) in enumerate(members)]
        wait_all(refs, timeout, f"weight group {name} ({self.backend}, {world} members)")
        self.generation, self.members = self.generation + 1, members
        logger.info("weight group %s: %s, learner rank 0 + rollout workers %s", name, self.backend,
                    [m for m, _ in members])

    def push(self, version: int) -> tuple[dict, dict[str, float]]:
        refs = {slot: self.rollout.receive_weights_remote(slot, version) for slot, _ in self.members}
        sent = self.learner.broadcast_weights_remote(version, self.dtype, self.cfg.bucket_bytes)
        return refs, wait_all(sent, self.cfg.push_timeout_s, "weight broadcast")[0]
