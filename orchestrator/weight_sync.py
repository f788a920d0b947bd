"""`WeightSync`: every push of learner weights to the rollout workers goes through here.

A push names its policy version and is bucketed (`base.weight_buckets`). Transports are a registry
keyed by ``rollout.weight_transport``:

- ``object_store``: learner rank 0 exports the buckets once into Ray's object store; each worker
  fetches them while it keeps generating.
- ``collective``: rank 0 broadcasts them over a weight group (`base.weight_group`) of learner
  rank 0 and the rollout workers, rebuilt whenever a worker comes, goes or restarts. A broadcast that
  fails falls back to the object store, and the log says so.

Pushes run in the background; `retire` collects the finished ones (raising past the deadline or on a
worker's failed load), `bring_to_current` gives a new or restarted worker the current weights before
it takes prompts, `drain` waits for them all at the end of a run. The collective group's membership
is (slot, incarnation) of every rollout worker, so an added, removed or restarted worker makes the
next push build a new group without being told.

Left out on purpose: partial (per-layer or adapter-only) pushes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.remote import wait_all

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rollout.config import RolloutConfig


@dataclass
class Push:
    """One push in flight: ``refs`` of the workers' receive calls, by slot, due by ``deadline`` (monotonic s)."""

    version: int
    deadline: float
    refs: dict[int, object]
    transport: str


class ObjectStoreTransport:
    """Export once to Ray's object store; every worker fetches the same buckets."""

    name = "object_store"

    def __init__(self, sync: WeightSync) -> None:
        self.sync = sync

    def push(self, version: int) -> tuple[dict[int, object], dict[str, float]]:
        """Start the push of ``version``; returns the receive refs by slot and the export metrics."""
        import ray

        s = self.sync
        buckets_ref, export_ref = s.learner.export_weights_remote(s.cfg.dtype, s.cfg.weight_bucket_bytes)
        s.last_export = (version, buckets_ref)
        refs = {slot: w.receive_weights.remote(version, buckets_ref) for slot, w in s.rollout.slots.items()}
        return refs, ray.get(export_ref, timeout=s.cfg.weight_push_timeout_s)

    def invalidate(self) -> None:
        """Nothing to rebuild: every push reaches the workers alive at that moment (transport protocol)."""


class CollectiveTransport:
    """Broadcast from learner rank 0 over a weight group of rank 0 and every rollout worker."""

    name = "collective"

    def __init__(self, sync: WeightSync) -> None:
        self.sync = sync
        self.generation = 0  # weight groups built so far
        self.members: tuple[tuple[int, int], ...] | None = None  # (slot, incarnation) of the current group

    def invalidate(self) -> None:
        """Build a new group before the next push even if the members look the same (a failed broadcast
        leaves the current group unusable)."""
        self.members = None

    def push(self, version: int) -> tuple[dict[int, object], dict[str, float]]:
        """Broadcast ``version``; returns the receive refs by slot and the export/broadcast metrics."""
        s = self.sync
        members = self._group()
        refs = {slot: s.rollout.slots[slot].receive_broadcast.remote() for slot, _ in members}
        out = wait_all([r.broadcast_weights.remote(version, s.cfg.dtype, s.cfg.weight_bucket_bytes)
                        for r in s.learner.ranks], s.cfg.weight_push_timeout_s, "weight broadcast")[0]
        return refs, out

    def _group(self) -> tuple[tuple[int, int], ...]:
        """The current weight group's members, (re)built when the workers changed since it was built."""
        import ray

        s, rc = self.sync, self.sync.cfg
        now = tuple((slot, s.rollout.incarnation[slot]) for slot in sorted(s.rollout.slots))
        if now == self.members:
            return now
        s.drain(rc.weight_push_timeout_s)  # a group changes only between pushes
        addr, port = ray.get(s.learner.ranks[0].master_address.remote(), timeout=60)
        name, world = f"{s.run_name}/weights/{self.generation + 1}", len(now) + 1
        timeout = rc.weight_push_timeout_s
        refs = [s.learner.ranks[0].join_weight_group.remote(s.backend, addr, port, world, timeout, name)]
        refs += [s.rollout.slots[slot].join_weight_group.remote(s.backend, addr, port, i + 1, world, timeout, name)
                 for i, (slot, _) in enumerate(now)]
        wait_all(refs, timeout, f"weight group {name} ({s.backend}, {world} members)")
        self.generation, self.members = self.generation + 1, now
        logger.info("weight group %s: %s, learner rank 0 + rollout workers %s", name, s.backend, [m for m, _ in now])
        return now


TRANSPORTS: dict[str, type] = {t.name: t for t in (ObjectStoreTransport, CollectiveTransport)}
"""Weight transports by ``rollout.weight_transport``."""


class WeightSync:
    """Pushes policy versions from the learner group to the rollout group.

    Args:
        cfg: `RolloutConfig` (``weight_transport``, ``collective_backend``, ``dtype``,
            ``weight_bucket_bytes``, ``weight_push_timeout_s``).
        learner: the `LearnerGroup`.
        rollout: the `RolloutGroup`.
        run_name: prefix of the collective group names.
        learner_has_gpus: whether learner ranks hold GPUs (``collective_backend = auto`` picks nccl
            when both sides have them).

    Raises:
        ValueError: an unknown ``weight_transport``.
    """

    def __init__(self, cfg: RolloutConfig, learner, rollout, run_name: str, learner_has_gpus: bool) -> None:
        if cfg.weight_transport not in TRANSPORTS:
            raise ValueError(f"rollout.weight_transport = {cfg.weight_transport!r} is not one of {sorted(TRANSPORTS)}")
        self.cfg, self.learner, self.rollout, self.run_name = cfg, learner, rollout, run_name
        backend = cfg.collective_backend
        if backend == "auto":
            backend = "nccl" if learner_has_gpus and cfg.num_gpus > 0 else "gloo"
        self.backend = backend
        self.transport = TRANSPORTS[cfg.weight_transport](self)
        self.fallback = ObjectStoreTransport(self)
        self.pushes: list[Push] = []
        self.last_export: tuple[int, object] | None = None  # (version, buckets ref) of the newest export
        self.fallbacks = 0  # pushes that fell back to the object store

    def push(self, version: int) -> dict[str, float]:
        """Start pushing ``version`` to every worker (in the background); returns export metrics.

        Raises:
            TimeoutError: the export did not finish within ``weight_push_timeout_s``.
        """
        import ray

        transport = self.transport
        try:
            refs, out = transport.push(version)
        except (ray.exceptions.RayError, TimeoutError) as e:
            if transport is self.fallback:
                raise
            logger.warning("weight push of version %d over %s failed (%s); falling back to the object store",
                           version, transport.name, e)
            transport.invalidate()  # rebuild the group before the next push
            self.fallbacks += 1
            transport = self.fallback
            refs, out = transport.push(version)
        # the receives are in flight from now: a fallback push gets its own full timeout
        self.pushes.append(Push(version, time.monotonic() + self.cfg.weight_push_timeout_s, refs, transport.name))
        return {**out, "weights/push_fallbacks_total": float(self.fallbacks)}

    def retire(self) -> float:
        """Collect finished pushes; returns the seconds workers spent loading them on arrival.

        A broadcast a worker failed to receive is re-sent to it through the object store; a dead worker
        is left to recovery (it gets the current weights then).

        Raises:
            TimeoutError: a push is past its deadline.
            RuntimeError: a worker failed to load pushed weights (names the worker and the version).
        """
        import ray

        still, seconds = [], 0.0
        for p in self.pushes:
            refs = list(p.refs.values())
            if ray.wait(refs, num_returns=len(refs), timeout=0)[1]:
                if time.monotonic() > p.deadline:
                    raise TimeoutError(f"weight push of policy version {p.version} to the rollout workers did not "
                                       f"finish within {self.cfg.weight_push_timeout_s:.0f} s")
                still.append(p)
                continue
            for slot, ref in p.refs.items():
                seconds += self._receipt(p, slot, ref)
        self.pushes = still
        return seconds

    def _receipt(self, p: Push, slot: int, ref) -> float:
        """Load seconds of one worker's finished receive; handles its failure (see `retire`)."""
        import ray

        try:
            return ray.get(ref)["load_seconds"]
        except ray.exceptions.RayActorError:
            logger.warning("weight push of version %d hit dead rollout worker %d; it gets the current weights "
                           "when it is recovered", p.version, slot)
        except ray.exceptions.RayTaskError as e:
            if p.transport == ObjectStoreTransport.name:
                raise RuntimeError(f"rollout worker {slot} failed to load the weights of policy version "
                                   f"{p.version}: {e}") from None
            logger.warning("weight broadcast of version %d failed on rollout worker %d (%s); sending it through "
                           "the object store instead", p.version, slot, type(e).__name__)
            self.transport.invalidate()
            self.fallbacks += 1
            self.bring_to_current(slot, p.version, f"rollout worker {slot} (broadcast fallback)")
        return 0.0

    def drain(self, timeout_s: float) -> float:
        """Wait for every push in flight, then retire them; returns load seconds.

        Raises:
            TimeoutError: they did not finish within ``timeout_s``.
        """
        import ray

        refs = [r for p in self.pushes for r in p.refs.values()]
        if len(ray.wait(refs, num_returns=len(refs), timeout=timeout_s)[0]) < len(refs):
            raise TimeoutError(f"weight pushes did not finish within {timeout_s:.0f} s")
        return self.retire()

    def bring_to_current(self, slot: int, version: int, who: str) -> None:
        """Give worker ``slot`` the weights of ``version`` through the object store and wait (bounded).

        Version 0 is the base model every worker starts with: nothing to send. Exports first when the
        newest export is older than ``version`` (the collective transport exports none).

        Raises:
            TimeoutError: the push did not finish within ``weight_push_timeout_s``.
        """
        if version == 0:
            return
        rc = self.cfg
        if self.last_export is None or self.last_export[0] < version:
            self.last_export = (version, self.learner.export_weights_remote(rc.dtype, rc.weight_bucket_bytes)[0])
        wait_all([self.rollout.slots[slot].receive_weights.remote(*self.last_export)], rc.weight_push_timeout_s,
                 f"weight push to {who}")

    def push_everywhere(self, version: int) -> None:
        """Push ``version`` through the object store to every worker and wait (bounded): a resumed run.

        Raises:
            TimeoutError: not done within ``weight_push_timeout_s``.
        """
        refs, _ = self.fallback.push(version)
        wait_all(list(refs.values()), self.cfg.weight_push_timeout_s, "weight push of the restored policy")
