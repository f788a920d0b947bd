"""The weight-transport protocol: how one policy version travels from the learner ranks to the rollout
workers. `orchestrator.weight_sync.WeightSync` drives it (pushes in flight, deadlines, fallback); a
transport only moves bytes.

A transport owns both ends of the wire through the group APIs (`learner.LearnerGroup`,
`rollout.RolloutGroup`), never through their actors: the learner side exports or sends, each rollout
worker receives through its one entry point, ``RolloutWorker.receive_weights(version, buckets=None)``
(buckets given: stage them; None: read one push from the worker's weight group).

A new transport is one module in this package with a config class (``type`` tag plus its own knobs) and
a `WeightTransport` subclass naming it; the package finds it (`orchestrator.weights.TRANSPORTS`) and
``[weights]`` in the run config accepts its ``type``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from pydantic import Field

from base.config import StrictConfig

Members = tuple[tuple[int, int], ...]
"""The rollout workers a push reaches: ``(slot, incarnation)`` of each, in slot order
(`rollout.RolloutGroup.members`); a restarted worker keeps its slot but gets a new incarnation."""


class WeightsConfigBase(StrictConfig):
    """Knobs every transport has; each transport's config adds its ``type`` and its own."""

    bucket_bytes: int = Field(512 << 20, ge=1 << 20, description="max bytes per weight bucket (one safetensors blob)")
    push_timeout_s: float = Field(
        300.0, gt=0, description="max seconds for one weight push, export to last worker loaded; past it the run "
        "stops (object store) or falls back to the object store (collective)")
    verify_every: int = Field(
        1, ge=0, le=1_000_000, description="every Nth policy version, each worker scores a fixed 32-token canary once "
        "it applied the push and the driver compares its logprobs with the learner's (sentinel bounds); a worker "
        "that fails is re-pushed once, then replaced (orchestrator.weight_verify); 0: never (checksums are always "
        "checked)")


class WeightTransport(ABC):
    """Moves the weights of one policy version from the learner group to the rollout workers.

    Args:
        cfg: this transport's config (a `WeightsConfigBase` subclass).
        learner: the run's `learner.LearnerGroup`.
        rollout: the run's `rollout.RolloutGroup`.
        dtype: dtype the workers' engines load (``rollout.dtype``).
        name: a name unique to the run (prefixes collective group names).
        gpus: whether learner ranks and rollout workers both hold GPUs.
    """

    type: ClassVar[str]
    """The ``weights.type`` that picks this transport."""
    config: ClassVar[type[WeightsConfigBase]]
    """Its config class."""
    fixed_membership: ClassVar[bool] = False
    """True: `setup` builds something for exactly the given workers (a collective group), so it runs again,
    with no push in flight, whenever they change; False: every push reaches whoever is there."""

    def __init__(self, cfg: WeightsConfigBase, learner: Any, rollout: Any, dtype: str, name: str,
                 gpus: bool) -> None:
        self.cfg, self.learner, self.rollout, self.dtype, self.name, self.gpus = cfg, learner, rollout, dtype, name, gpus
        self.members: Members | None = None  # what the last `setup` was for; None: set up before the next push

    def setup(self, members: Members) -> None:
        """Prepare pushes to ``members`` (called before a push when they differ from `self.members`).

        Raises:
            TimeoutError: set-up did not finish within ``push_timeout_s``.
        """
        self.members = members

    @abstractmethod
    def push(self, version: int) -> tuple[dict[int, Any], dict[str, float]]:
        """Start sending policy ``version`` to `self.members`; returns one receipt ObjectRef per slot (the
        worker's ``receive_weights`` result: ``{"bytes", "applied", "load_seconds"}``) and the learner
        side's metrics (``weights/*``). The receipts may still be in flight on return.

        Raises:
            TimeoutError: the learner side did not finish within ``push_timeout_s``.
            ray.exceptions.RayError: a learner rank or worker failed.
        """

    def forget(self, slot: int) -> None:
        """Worker ``slot`` gets its weights elsewhere now (`WeightSync` pushes them again through the object store, or
        it was replaced): forget what this transport sent it. Nothing to forget by default."""

    def invalidate(self) -> None:
        """Forget the set-up (a failed push can leave it unusable): `setup` runs again before the next push."""
        self.members = None

    def close(self) -> None:
        """Release what `setup` built (end of run)."""
        self.members = None
