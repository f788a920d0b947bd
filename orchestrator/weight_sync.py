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

Every push is verified. Each worker checks the checksums of the bytes it received before it loads any
(`base.weight_buckets.verify_checksums`); every ``weights.verify_every`` versions it also scores a canary once it
applied the push and `retire` compares that with the learner's (`orchestrator.weight_verify`). A worker that fails
either is pushed the weights again, once, in full through the object store (``weights/repushes_total``); failing
again, it is replaced by a new actor in its slot (`RolloutGroup.replace`, as for a hung worker;
``weights/verify_replaced_total``), whose weights are checked too; a replacement that fails stops the run with one
line naming the worker, the version and why. ``weights/verify_failures_total`` counts every failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from base.weight_buckets import WeightChecksumError
from orchestrator.remote import wait_all
from orchestrator.weight_verify import CanaryChecks
from orchestrator.weights import WeightsConfigBase, make_transport
from orchestrator.weights.object_store import ObjectStoreTransport, ObjectStoreWeights

logger = logging.getLogger(__name__)


@dataclass
class Push:
    """One push in flight: ``refs`` of the workers' receive calls, by slot, due by ``deadline`` (monotonic s);
    ``check``: start a canary check of each worker that received it."""

    version: int
    deadline: float
    refs: dict[int, Any]
    transport: str
    check: bool = False


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
        bounds: the sentinel's bounds (``[sentinel]``) the canary checks use; None: no canary checks (checksums
            are still checked).
    """

    def __init__(self, cfg: WeightsConfigBase, learner: Any, rollout: Any, dtype: str, run_name: str,
                 gpus: bool, bounds: Any = None) -> None:
        self.cfg, self.learner, self.rollout = cfg, learner, rollout
        self.transport = make_transport(cfg, learner, rollout, dtype, run_name, gpus)
        if isinstance(self.transport, ObjectStoreTransport):
            self.fallback = self.transport
        else:
            fallback_cfg = ObjectStoreWeights(bucket_bytes=cfg.bucket_bytes, push_timeout_s=cfg.push_timeout_s)
            self.fallback = ObjectStoreTransport(fallback_cfg, learner, rollout, dtype, run_name, gpus)
        self.pushes: list[Push] = []
        self.fallbacks = 0  # pushes that fell back to the object store
        self.canary = (CanaryChecks(cfg.verify_every, bounds, learner, rollout, cfg.push_timeout_s)
                       if bounds is not None and cfg.verify_every else None)
        if self.canary is not None:
            self.canary.tokens()  # now, before any request: the tokenizer is not shared with a generation yet
        self.newest = 0  # newest version pushed
        self.failures: dict[int, int] = {}  # slot -> verifications failed since it last passed one
        self.verify_failures = self.repushes = self.replaced = 0

    def _ready(self, transport) -> None:
        """Set ``transport`` up for the workers there now, if they changed since its last set-up."""
        members = self.rollout.members()
        if members == transport.members:
            return
        if transport.fixed_membership:
            self.drain(self.cfg.push_timeout_s, checks=False)  # its members change only between pushes
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
        check = self.canary is not None and self.canary.due(version)
        if check:
            self.canary.expect(version)  # the ranks run it right after the export
        # the receives are in flight from now: a fallback push gets its own full timeout
        self.pushes.append(Push(version, time.monotonic() + self.cfg.push_timeout_s, refs, transport.type, check))
        self.newest = max(self.newest, version)
        return {**out, "weights/push_fallbacks_total": float(self.fallbacks), **self.verify_metrics()}

    def verify_metrics(self, run: bool = False) -> dict[str, float]:
        """Run totals of push verification (``weights/verify_failures_total``: checksum or canary failures,
        ``weights/repushes_total``, ``weights/verify_replaced_total``) and the canary metrics
        (`CanaryChecks.metrics`, over the whole run with ``run``: a summary); counted on the driver, over all
        workers."""
        out = {"weights/verify_failures_total": float(self.verify_failures),
               "weights/repushes_total": float(self.repushes), "weights/verify_replaced_total": float(self.replaced)}
        if self.canary is None:
            return out
        return {**out, **(self.canary.metrics(run=True) if run else self.canary.metrics())}

    def retire(self) -> float:
        """Collect finished pushes; returns the seconds workers spent loading them on arrival.

        A broadcast a worker failed to receive is re-sent to it through the object store; a dead worker
        is left to recovery (it gets the current weights then).

        Judges finished canary checks too; a worker that failed a checksum or a canary is pushed again or
        replaced (see the module doc).

        Raises:
            TimeoutError: a push or a canary check is past its deadline.
            RuntimeError: a worker failed to load pushed weights (names the worker and the version), or a
                replaced worker failed verification.
        """
        import ray

        still, seconds, todo = [], 0.0, self.pushes
        self.pushes = []  # a failed receipt may start a new push
        for p in todo:
            refs = list(p.refs.values())
            if ray.wait(refs, num_returns=len(refs), timeout=0)[1]:
                if time.monotonic() > p.deadline:
                    raise TimeoutError(f"weight push of policy version {p.version} to the rollout workers did not "
                                       f"finish within weights.push_timeout_s = {self.cfg.push_timeout_s:.0f} s")
                still.append(p)
                continue
            for slot, ref in p.refs.items():
                seconds += self._receipt(p, slot, ref)
        self.pushes = still + self.pushes
        for v in self.canary.poll() if self.canary is not None else []:
            if v.ok is None or self.rollout.incarnation.get(v.slot) != v.incarnation:
                continue  # not compared, or the worker was replaced since
            if v.ok:
                self.failures.pop(v.slot, None)
            else:
                self._failed(v.slot, v.version, v.why)
        return seconds

    def _receipt(self, p: Push, slot: int, ref) -> float:
        """Load seconds of one worker's finished receive; handles its failure (see `retire`)."""
        import ray

        try:
            seconds = ray.get(ref)["load_seconds"]
            if p.check:
                self.canary.start(slot, p.version)
            return seconds
        except ray.exceptions.RayActorError:
            logger.warning("weight push of version %d hit dead rollout worker %d; it gets the current weights "
                           "when it is recovered", p.version, slot)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e, WeightChecksumError) or isinstance(getattr(e, "cause", None), WeightChecksumError):
                self._failed(slot, p.version, str(getattr(e, "cause", e)).splitlines()[0])
                return 0.0
            if p.transport == ObjectStoreTransport.type:
                raise RuntimeError(f"rollout worker {slot} failed to load the weights of policy version "
                                   f"{p.version}: {e}") from None
            logger.warning("weight broadcast of version %d failed on rollout worker %d (%s); sending it through "
                           "the object store instead", p.version, slot, type(e).__name__)
            self.transport.invalidate()
            self.fallbacks += 1
            self.bring_to_current(slot, p.version, f"rollout worker {slot} (broadcast fallback)")
        return 0.0

    def _failed(self, slot: int, version: int, why: str) -> None:
        """Worker ``slot`` failed verification of ``version``: the first time since it last passed one it is pushed
        the weights again (full, object store), the second time replaced by a new actor that is pushed them.

        Raises:
            RuntimeError: it failed a third time (a replacement failed too): one line naming it, the version, why.
        """
        self.verify_failures += 1
        if slot not in self.rollout.slots:  # retired meanwhile
            return
        n = self.failures[slot] = self.failures.get(slot, 0) + 1
        if n > 2:
            raise RuntimeError(f"rollout worker {slot} failed verification of the weights of policy version {version} "
                               f"after a re-push and a replacement: {why}; the engine does not serve what the learner "
                               "pushes (a loader or kernel bug?); set weights.verify_every = 0 to skip the canary")
        logger.warning("rollout worker %d failed verification of policy version %d (%s); %s", slot, version, why,
                       "pushing the weights to it again" if n == 1 else "replacing it")
        if n == 2:
            self.rollout.replace(slot)
            self.replaced += 1
        self.transport.forget(slot)  # it gets the full weights now, whatever the transport sent it before
        self.repushes += n == 1
        self.pushes.append(self._send(slot, max(self.newest, version)))  # retired in the background

    def _send(self, slot: int, version: int) -> Push:
        """Start pushing ``version`` or newer (`bring_to_current`'s label) to worker ``slot`` through the object
        store, with a canary check after it when checks are on; returns the push, for the caller to wait on or to
        retire."""
        ref = self.fallback.send_to(slot, self.learner.version_at_next_call(version))
        label = self.fallback.last_export[0]
        if self.canary is not None:
            self.canary.expect(label)  # the ranks run it right after that export
        return Push(label, time.monotonic() + self.cfg.push_timeout_s, {slot: ref}, ObjectStoreTransport.type,
                    self.canary is not None)

    def drain(self, timeout_s: float, checks: bool = True) -> float:
        """Wait for every push and (with ``checks``) canary check in flight, and the re-pushes they lead to, retiring
        them; returns load seconds.

        Raises:
            TimeoutError: they did not finish within ``timeout_s``.
        """
        import ray

        deadline, seconds = time.monotonic() + timeout_s, 0.0
        while True:
            refs = [r for p in self.pushes for r in p.refs.values()] + (self.canary.refs() if checks and self.canary
                                                                         else [])
            if not refs:
                return seconds
            left = deadline - time.monotonic()
            if left <= 0 or len(ray.wait(refs, num_returns=len(refs), timeout=left)[0]) < len(refs):
                raise TimeoutError(f"weight pushes did not finish within {timeout_s:.0f} s")
            seconds += self.retire()

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
        import ray

        p = self._send(slot, version)  # waited for here; its receipt starts the canary check
        if not ray.wait(list(p.refs.values()), timeout=self.cfg.push_timeout_s)[0]:
            raise TimeoutError(f"weight push to {who} did not finish within {self.cfg.push_timeout_s:.0f} s")
        self._receipt(p, slot, p.refs[slot])

    def push_everywhere(self, version: int) -> None:
        """Push ``version`` through the object store to every worker and wait (bounded): a resumed run.

        Raises:
            TimeoutError: not done within ``push_timeout_s``.
        """
        self._ready(self.fallback)
        refs, _ = self.fallback.push(version)
        self.newest = max(self.newest, version)
        wait_all(list(refs.values()), self.cfg.push_timeout_s, "weight push of the restored policy")

    def learner_replaced(self, version: int) -> None:
        """The learner's ranks were replaced (`orchestrator.failover`) and hold ``version``: forget the pushes and
        canaries in flight from the old ranks and every transport's set-up (a collective group held the old rank 0)
        and what each sent each worker, then push ``version`` to every worker through the object store and wait
        (bounded), so every worker holds exactly what the new ranks hold (version 0: the base model, nothing to send).

        Raises:
            TimeoutError: the push did not finish within ``push_timeout_s``.
        """
        self.pushes = []
        for t in (self.transport, self.fallback):
            t.invalidate()
            for slot in list(self.rollout.slots):
                t.forget(slot)
        if self.canary is not None:
            self.canary.expected.clear()  # the old ranks' canaries: checks in flight are not compared
        if version:
            self.push_everywhere(version)

    def close(self) -> None:
        """Release the transports' set-up (end of run)."""
        self.transport.close()
        self.fallback.close()
