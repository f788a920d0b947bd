"""``weights.type = "delta"``: each push sends only what changed since the version a worker holds.

Learner rank 0 exports the full buckets as for the object store; the driver decodes them, keeps them as the base
of the next push and encodes the difference from the previous version (`base.weight_delta`: per tensor nothing,
the changed elements' positions and the XOR of their bits, compressed, or the whole tensor when most of it
changed). A worker gets the delta when it
holds exactly the previous version pushed through this transport, else the full weights in the same format; every
``full_every`` versions everyone gets the full weights. Delta and full buckets each go once into Ray's object store,
so workers fetch them as with ``object_store``. The worker reconstructs the version bit for bit
(`base.weight_delta.DeltaReceiver`, from `rollout.RolloutWorker.receive_weights`).

Memory: the driver keeps the previous version's tensors in the rollout dtype (one model copy, e.g. 269 MB for
SmolLM2-135M in bf16); during a push it briefly holds the new version decoded and the encoded buckets too (up to
~3 copies). Each rollout worker keeps one copy of the version it holds.

Left out on purpose: encoding on learner rank 0 (the export is shared with the object store as it is), and
fewer bytes on the learner-to-driver hop (the full export still travels once; the delta saves the hops to every
worker, which on several nodes are the ones that cross the network).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import Field

from orchestrator.weights.base import Members, WeightsConfigBase, WeightTransport

logger = logging.getLogger(__name__)


class DeltaWeights(WeightsConfigBase):
    """Changed tensors only (XOR of the bits, compressed), a full push every ``full_every`` versions."""

    type: Literal["delta"] = Field("delta", description="only what changed since the version each worker holds "
                                   "(positions and XOR of the changed bits, compressed), through Ray's object store")
    full_every: int = Field(20, ge=1, le=100_000, description="every worker gets the full weights at least every "
                            "this many pushes (1: every push is full); new or restarted workers get them at once")
    dense_frac: float = Field(0.5, gt=0, le=1, description="a tensor with more than this fraction of its elements "
                              "changed is sent whole instead of as compressed positions and XORs")


class DeltaTransport(WeightTransport):
    """Deltas against the previous pushed version through Ray's object store; full weights where needed."""

    type = "delta"
    config = DeltaWeights

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prev: tuple[int, dict] | None = None  # (version, its tensors by name): the base of the next delta
        self.held: dict[tuple[int, int], int] = {}  # (slot, incarnation) -> version this transport sent it
        self.deltas_since_full = 0

    def setup(self, members: Members) -> None:
        """Forget the workers that are gone or restarted (a new incarnation holds the base model): they get the
        full weights next."""
        self.held = {m: v for m, v in self.held.items() if m in members}
        self.members = members

    def forget(self, slot: int) -> None:
        """Worker ``slot`` gets the full weights next (it was pushed them elsewhere, or replaced)."""
        self.held = {m: v for m, v in self.held.items() if m[0] != slot}

    def invalidate(self) -> None:
        """After a failed push nobody's version is known: everyone gets the full weights next."""
        super().invalidate()
        self.held.clear()

    def push(self, version: int) -> tuple[dict[int, Any], dict[str, float]]:
        """Export ``version``, encode it against the previous push and send each worker its delta or the full
        weights.

        Returns metrics besides the export's: ``weights/delta_bytes`` (bytes of the delta buckets, 0 when every
        worker got the full weights), ``weights/delta_full_bytes`` (the same version in full, in this format),
        ``weights/delta_changed_frac`` (changed elements / all elements), ``weights/delta_encode_seconds``
        (decode of the export, encoding and packing, driver side) and ``weights/delta_full_workers`` (workers sent
        the full weights). One value per push, from the driver: a run's series is summed or averaged over pushes.

        Raises:
            TimeoutError: the export did not finish within ``push_timeout_s``.
            ray.exceptions.RayError: learner rank 0 failed.
        """
        import ray

        from base.weight_buckets import iter_buckets, seal, verify_checksums
        from base.weight_delta import encode, to_buckets

        buckets_ref, metrics_ref = self.learner.export_weights_remote(self.dtype, self.cfg.bucket_bytes)
        metrics = ray.get(metrics_ref, timeout=self.cfg.push_timeout_s)
        t0 = time.perf_counter()
        export = ray.get(buckets_ref, timeout=self.cfg.push_timeout_s)
        new = dict(iter_buckets(verify_checksums(export, "the driver (delta encoding)", version)))
        prev = self.prev
        full_due = prev is None or self.deltas_since_full + 1 >= self.cfg.full_every
        delta_to = [] if full_due else [s for s, i in self.members if self.held.get((s, i)) == prev[0]]
        full_to = [s for s, _ in self.members if s not in delta_to]
        refs, out, bb = {}, {}, self.cfg.bucket_bytes
        if delta_to:
            payload, entries = encode(prev[1], new, self.cfg.dense_frac)
            changed = sum(e["changed"] if "changed" in e else _numel(e["shape"]) for e in entries.values())
            delta = seal(to_buckets(version, prev[0], payload, entries, bb))  # checked by each worker
            out["weights/delta_bytes"] = float(sum(map(len, delta)))
            out["weights/delta_changed_frac"] = changed / max(1, sum(t.numel() for t in new.values()))
            ref = ray.put(delta)
            refs.update({s: self.rollout.receive_weights_remote(s, version, ref) for s in delta_to})
            self.deltas_since_full += 1
        else:
            out["weights/delta_bytes"] = 0.0
        if full_to:
            full = seal(to_buckets(version, None, new, {n: _meta(t) for n, t in new.items()}, bb))
            out["weights/delta_full_bytes"] = float(sum(map(len, full)))
            ref = ray.put(full)
            refs.update({s: self.rollout.receive_weights_remote(s, version, ref) for s in full_to})
            if full_due:
                self.deltas_since_full = 0
        out["weights/delta_encode_seconds"] = time.perf_counter() - t0
        out["weights/delta_full_workers"] = float(len(full_to))
        self.held = {(s, i): version for s, i in self.members}
        self.prev = (version, new)
        logger.debug("weight push %d: delta to %s, full to %s", version, delta_to, full_to)
        return dict(sorted(refs.items())), {**metrics, **out}

    def close(self) -> None:
        """Drop the kept version (end of run)."""
        super().close()
        self.prev, self.held = None, {}


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _meta(t: Any) -> dict[str, Any]:
    """A ``full`` entry of `base.weight_delta` for tensor ``t``."""
    return {"kind": "full", "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
