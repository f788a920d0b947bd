"""`WeightSync`: every push of learner weights to the rollout workers goes through here.

A push names its policy version and is bucketed (`base.weight_buckets`). How the bytes travel is the
transport's business (`orchestrator.weights`, chosen by ``weights.type``): ``object_store`` (the
default) or ``collective`` (a broadcast from learner rank 0; a broadcast that fails falls back to the
object store, and the log says so). Adapter-only pushes (``learner.lora``) go through either: the
learner then exports the adapter tensors alone.

Pushes run in the background; `retire` collects the finished ones (raising past the deadline or on a
worker's failed load), `bring_to_current` gives a new or restarted worker the current weights before
it takes prompts, `drain` waits for them all at the end of a run. Before each push the rollout group's
membership, ``(slot, incarnation)`` of every worker, is compared with what the transport was set up
for, so an added, removed or restarted worker makes a fixed-membership transport set up anew (with no
push in flight) without being told.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from orchestrator.remote import wait_all
from orchestrator.weights import WeightsConfigBase, make_transport
from orchestrator.weights.object_store import ObjectStoreTransport, ObjectStoreWeights

logger = logging.getLogger(__name__)


@dataclass
class Push:
    """One push in flight: ``refs`` of the workers' receive calls, by slot, due by ``deadline`` (monotonic s)."""

    version: int
    deadline: float
    refs: dict[int, Any]
    transport: str


class WeightSync:
    """Pushes policy versions from the learner group to the rollout group.

    Args:
        cfg: the ``[weights]`` section (one transport's config: ``type``, ``bucket_bytes``,
            ``push_timeout_s``, that transport's own knobs).
        learner: the `LearnerGroup`.
        rollout: the `RolloutGroup`.
        dtype: dtype the rollout engines load (``rollout.dtype``).
        run_name: prefix of the collective group names.
        gpus: whether learner ranks and rollout workers both hold GPUs (``backend = "auto"`` picks nccl then).
    """

    def __init__(self, cfg: WeightsConfigBase, learner: Any, rollout: Any, dtype: str, run_name: str,
                 gpus: bool) -> None:
        self.cfg, self.learner, self.rollout = cfg, learner, rollout
        self.transport = make_transport(cfg, learner, rollout, dtype, run_name, gpus)
        if isinstance(self.transport, ObjectStoreTransport):
            self.fallback = self.transport
        else:
            fallback_cfg = ObjectStoreWeights(bucket_bytes=cfg.bucket_bytes, push_timeout_s=cfg.push_timeout_s)
            self.fallback = ObjectStoreTransport(fallback_cfg, learner, rollout, dtype, run_name, gpus)
        self.pushes: list[Push] = []
        self.fallbacks = 0  # pushes that fell back to the object store

    def _ready(self, transport) -> None:
        """Set ``transport`` up for the workers there now, if they changed since its last set-up."""
        members = self.rollout.members()
        if members == transport.members:
            return
        if transport.fixed_membership:
            self.drain(self.cfg.push_timeout_s)  # its members change only between pushes
        transport.setup(members)

    def push(self, version: int) -> dict[str, float]:
        """Start pushing ``version`` to every worker (in the background); returns export metrics.

        Raises:
            TimeoutError: the export did not finish within ``push_timeout_s``.
        """
        import ray

        transport = self.transport
        try:
            self._ready(transport)
            refs, out = transport.push(version)
        except (ray.exceptions.RayError, TimeoutError) as e:
            if transport is self.fallback:
                raise
            logger.warning("weight push of version %d over %s failed (%s); falling back to the object store",
                           version, transport.type, e)
            transport.invalidate()  # set up anew before the next push
            self.fallbacks += 1
            transport = self.fallback
            self._ready(transport)
            refs, out = transport.push(version)
        # the receives are in flight from now: a fallback push gets its own full timeout
        self.pushes.append(Push(version, time.monotonic() + self.cfg.push_timeout_s, refs, transport.type))
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
                                       f"finish within weights.push_timeout_s = {self.cfg.push_timeout_s:.0f} s")
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
            if p.transport == ObjectStoreTransport.type:
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
        """Give worker ``slot`` the weights of ``version`` or newer through the object store and wait (bounded).

        The push is labelled with the version the learner holds when its export runs
        (`learner.LearnerGroup.version_at_next_call`): with a train step in flight the export waits for it on
        every rank and carries the step's new weights, so they are labelled ``version + 1``, not ``version``.
        Version 0 is the base model every worker starts with: nothing to send (it gets the next push).

        Raises:
            TimeoutError: the push did not finish within ``push_timeout_s``.
        """
        if version == 0:
            return
        version = self.learner.version_at_next_call(version)
        wait_all([self.fallback.send_to(slot, version)], self.cfg.push_timeout_s, f"weight push to {who}")

    def push_everywhere(self, version: int) -> None:
        """Push ``version`` through the object store to every worker and wait (bounded): a resumed run.

        Raises:
            TimeoutError: not done within ``push_timeout_s``.
        """
        self._ready(self.fallback)
        refs, _ = self.fallback.push(version)
        wait_all(list(refs.values()), self.cfg.push_timeout_s, "weight push of the restored policy")

    def close(self) -> None:
        """Release the transports' set-up (end of run)."""
        self.transport.close()
        self.fallback.close()
