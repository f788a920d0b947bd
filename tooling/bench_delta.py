"""The ``weight_push_delta`` benchmark of `relayrl bench`: bytes and seconds per weight push, delta
(``weights.type = "delta"``, `orchestrator.weights.delta`) against full (the object store), between real
consecutive learner versions of the config's model (real `train_step` s on one real batch).

Left out on purpose: several nodes (on one node the object store is shared memory, so bytes saved barely show in
seconds; the bytes per worker are what crosses the network on a cluster), and the collective transport.
"""

from __future__ import annotations

import statistics
import time

from tooling.bench_math import Row, row, spread_row
from tooling.bench_session import PUSH_REPEATS, Session, pushes

DELTA_STEPS = 3  # learner steps, each followed by a delta push

NOTE = ("`weight_push_delta`: on one rig (the config's model, learner and one rollout worker set), first "
        f"{PUSH_REPEATS} full pushes through the object store (as `weight_push`), then a `DeltaTransport` push of the "
        f"same version (its first push is full, in the delta format), then {DELTA_STEPS} times a real learner "
        "`train_step` on one real batch of `samples_per_step` generated samples followed by a delta push of the new "
        "version (medians over those). Bytes are what each worker fetches; push seconds run from the export to the "
        "last worker reloaded (for the delta transport, the driver's decode of the export and its encoding "
        "included, also shown alone as 'encode'). Changed elements: the share of the rollout-dtype values whose "
        "bits differ from the previous version. One node here: the object store is shared memory, so fewer bytes "
        "save little time; across nodes the bytes per worker are what crosses the network.")


def bench_weight_push_delta(s: Session) -> dict[str, Row]:
    """Full and delta pushes of the config's model: MB per worker, seconds per push, driver encode seconds,
    changed-element share, and delta bytes as a share of the full push."""
    import ray
    import safetensors.torch  # noqa: F401  (the driver's first torch import: a run pays it once, not per push)

    from orchestrator.weights.delta import DeltaTransport, DeltaWeights

    batch = s.batch()
    full = pushes(s)  # object-store baseline; also makes the workers serve pushed weights
    _, rollout, learner = s.rig()
    wc, rc = s.cfg.weights, s.cfg.rollout
    transport = DeltaTransport(DeltaWeights(bucket_bytes=wc.bucket_bytes, push_timeout_s=wc.push_timeout_s), learner,
                               rollout, rc.dtype, "bench-delta", False)
    transport.setup(rollout.members())
    done = []
    for i in range(DELTA_STEPS + 1):
        if i:  # the next real policy version
            # version: the newest pushed, so the batch's samples are never from the future
            ray.get(learner.train_step_remote(batch, s.pushed_version), timeout=s.cfg.learner.step_timeout_s)
        s.pushed_version += 1
        t0 = time.perf_counter()
        refs, m = transport.push(s.pushed_version)
        got = ray.get(list(refs.values()), timeout=wc.push_timeout_s)
        push_s = time.perf_counter() - t0
        deferred = [ray.get(s.request(w, 1), timeout=rc.request_timeout_s).load_seconds
                    for w, g in zip(rollout.workers, got) if not g["applied"]]
        done.append({"kind": "delta" if m["weights/delta_bytes"] else "full", "bytes": max(g["bytes"] for g in got),
                     "full_bytes": m["weights/bytes"], "encode_s": m["weights/delta_encode_seconds"],
                     "changed_frac": m.get("weights/delta_changed_frac", 1.0), "push_s": push_s + sum(deferred)})
    transport.close()
    s.raw["weight_push_delta"] = {"object_store_pushes": full, "delta_transport_pushes": done,
                                  "learner_lr": s.cfg.learner.lr}
    if not any(p["kind"] == "delta" for p in done):
        raise RuntimeError(f"no delta push among {done}: every worker got the full weights")
    return delta_rows(full, done)


def delta_rows(full: list[dict[str, float]], done: list[dict[str, float]]) -> dict[str, Row]:
    """The ``weight_push_delta`` rows (min/median/max where repeated) from the object store's full pushes
    (`bench_session.pushes`: ``bytes``, ``push_s``) and the delta transport's pushes, its first one full (``kind``,
    ``bytes``, ``push_s``, ``encode_s``, ``changed_frac``).

    Raises:
        ValueError: no full push, or no delta push among ``done``.
    """
    deltas = [p for p in done if p["kind"] == "delta"]
    if not full or not deltas or done[0]["kind"] != "full":
        raise ValueError(f"need full object-store pushes ({len(full)}) and a full then delta pushes through the "
                         f"delta transport (kinds {[p['kind'] for p in done]})")

    def each(ps, k, scale=1.0):
        return [scale * p[k] for p in ps]

    first = done[0]
    full_mb = statistics.median(each(full, "bytes", 1e-6))
    return {"full, object store: MB per worker": spread_row(each(full, "bytes", 1e-6), "MB"),
            "full, object store: push": spread_row(each(full, "push_s"), "s"),
            "full, delta transport: MB per worker": row(first["bytes"] / 1e6, "MB"),
            "full, delta transport: push": row(first["push_s"], "s"),
            "delta: MB per worker": spread_row(each(deltas, "bytes", 1e-6), "MB"),
            "delta: push": spread_row(each(deltas, "push_s"), "s"),
            "delta: encode (driver)": spread_row(each(deltas, "encode_s"), "s"),
            "delta: changed elements": spread_row(each(deltas, "changed_frac", 100.0), "%"),
            "delta / full bytes": spread_row([100 * mb / full_mb for mb in each(deltas, "bytes", 1e-6)], "%")}
