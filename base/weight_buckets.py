"""The weight-bucket format: a policy version's weights as a few safetensors byte strings.

The learner exports (`serialize_buckets`), the transports move the bytes (Ray's object store, or a
collective broadcast: `base.weight_group`), and the rollout engine loads them
(`iter_buckets`). Buckets bound the size of each message (never one RPC per parameter); a push always
names the policy version it carries. Both sides depend on this module, not on each other.

Left out on purpose: quantised or delta formats (full tensors in the export dtype only; deltas are
`base.weight_delta`, which packs into the same container).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def serialize_buckets(named_tensors: Iterable[tuple[str, object]], bucket_bytes: int) -> list[bytes]:
    """Pack ``(name, tensor)`` pairs into safetensors byte strings of at most ~``bucket_bytes`` bytes.

    A tensor larger than ``bucket_bytes`` gets a bucket of its own. Returns the buckets in order.

    Raises:
        ValueError: ``bucket_bytes < 1``.
    """
    from safetensors.torch import save

    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    buckets: list[bytes] = []
    cur: dict = {}
    cur_bytes = 0
    for name, t in named_tensors:
        size = t.numel() * t.element_size()
        if cur and cur_bytes + size > bucket_bytes:
            buckets.append(save(cur))
            cur, cur_bytes = {}, 0
        cur[name] = t.contiguous()
        cur_bytes += size
    if cur:
        buckets.append(save(cur))
    return buckets


def iter_buckets(buckets: Iterable[bytes]) -> Iterator[tuple[str, object]]:
    """Yield ``(name, tensor)`` from buckets written by `serialize_buckets`, in order."""
    from safetensors.torch import load

    for b in buckets:
        yield from load(b).items()
