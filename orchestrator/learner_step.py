"""A learner step in flight, seen from the driver: start it on a batch, poll it, judge its outcome.

Left out on purpose: the training itself (`learner.worker.LearnerWorker.train_step`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class LearnerStep:
    """One step on every rank: ``refs`` (one metrics ref per rank), the buffer's `BatchStats` ref,
    its ``deadline`` (monotonic seconds), the policy ``version`` it starts from, and the sentinel's check
    that runs before it (`orchestrator.sentinel.Probe`), if any."""

    refs: list
    stats_ref: object
    deadline: float
    version: int
    probe: object | None = None
    batch_ref: object = None  # the batch (ObjectRef), kept to start the step again after a learner failover
    timeout_s: float = 0.0

    @classmethod
    def start(cls, buffer, learner, num_groups: int, version: int, min_version: int, timeout_s: float) -> LearnerStep:
        """Take ``num_groups`` groups no older than ``min_version`` from the buffer straight into a
        step of every learner rank (the batch never passes through the driver)."""
        batch_ref, stats_ref = buffer.take_batch.options(num_returns=2).remote(num_groups, version, min_version)
        return cls(learner.train_step_remote(batch_ref, version), stats_ref, time.monotonic() + timeout_s, version,
                   batch_ref=batch_ref, timeout_s=timeout_s)

    def restart(self, learner) -> None:
        """Start this step again, on the same batch, on ``learner``'s ranks (new ones after a failover), with a new
        deadline; the sentinel's probe, if any, is the caller's to start again first."""
        self.refs = learner.train_step_remote(self.batch_ref, self.version)
        self.deadline = time.monotonic() + self.timeout_s

    def done(self) -> bool:
        """Whether every rank finished; raises at once if a rank died (its peers would wait in a
        collective until the timeout).

        Raises:
            LearnerRankDied: a learner rank died (`orchestrator.failover` replaces the ranks).
        """
        import ray

        from learner.group import LearnerRankDied

        ready, pending = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                raise LearnerRankDied(self.refs.index(ref), f"step {self.version + 1}", type(e).__name__) from None
        return not pending


class SkippedSteps:
    """Counts optimizer steps skipped for non-finite gradients in a row.

    Args:
        limit: ``learner.max_skipped_steps``.
    """

    def __init__(self, limit: int) -> None:
        self.limit, self.in_a_row = limit, 0

    def check(self, version: int, m: dict[str, float]) -> None:
        """Account step ``version``'s metrics ``m``.

        Raises:
            RuntimeError: ``limit`` skipped steps in a row.
        """
        if m.get("learner/skipped_steps", 0) == 0:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        logger.warning("step %d: optimizer step skipped: non-finite gradients (loss %s)", version, m.get("learner/loss"))
        if self.in_a_row >= self.limit:
            raise RuntimeError(f"{self.in_a_row} consecutive optimizer steps had non-finite gradients "
                               f"(learner.max_skipped_steps = {self.limit}); last loss {m.get('learner/loss')}")
