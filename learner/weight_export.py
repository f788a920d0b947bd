"""Weight export of a learner rank: the push side of weight sync, which `learner.worker.LearnerWorker`'s
``export_weights`` / ``broadcast_weights`` (and `learner.checkpointing`'s ``save_pretrained``) delegate to.

Plain functions on a rank's model module and its position (rank, ZeRO stage), so they run on a plain
``torch.nn.Module`` in unit tests:

- `gathered_named_params`: full tensors, on CPU, on rank 0 only (under ZeRO-3 every rank enters each gather;
  ranks > 0 keep no copy, so no rank but 0 ever holds the full model on its host).
- `export_buckets`: those tensors cast to the rollout dtype and packed into safetensors buckets
  (`base.weight_buckets`, the format the engine loads), with export metrics.
- `broadcast`: rank 0 sends the buckets over its weight group (`base.weight_group.WeightGroup`) within what is
  left of the group's timeout.

Left out on purpose: the actor's own state (which weight group it is in, and dropping one that failed:
`LearnerWorker`), the transport choice (`orchestrator.weights`), and the engine side (loading the buckets).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from base.weight_group import WeightGroup

EXPORT_DTYPES = ("bfloat16", "float32", "float16")
"""Rollout dtypes a weight export casts to (names of ``torch`` dtypes)."""


def gathered_named_params(module: torch.nn.Module, rank: int, zero_stage: int, adapters_only: bool = False
                          ) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Yield ``(name, full tensor on CPU)`` on rank 0; under ZeRO-3 every rank must iterate it to the end, and
    ranks > 0 take part in each gather but get ``(name, None)`` (no full copy on their host); under ZeRO-1/2
    ranks > 0 get nothing.

    Args:
        module: the rank's model (``engine.module``; under ZeRO-3 its parameters are partitioned).
        rank, zero_stage: this rank's place in the learner group and ``learner.zero_stage``.
        adapters_only: the LoRA adapter tensors only, named as in PEFT's adapter files (the adapter name
            dropped, as ``get_peft_model_state_dict`` does).

    Names are HF names, or with LoRA PEFT's (``base_model.model.<hf name>``). Tied parameters appear once
    (``named_parameters`` de-duplicates), which is what vLLM's loader expects for tied embeddings.
    """
    if rank != 0 and zero_stage != 3:
        return
    for name, p in module.named_parameters():
        if adapters_only:
            if ".lora_" not in name:
                continue
            name = name.replace(".default.", ".")  # PEFT's adapter-file naming (get_peft_model_state_dict)
        if zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                yield name, (p.detach().to("cpu", copy=True) if rank == 0 else None)
        else:
            yield name, p.detach().to("cpu")


def export_buckets(named: Iterable[tuple[str, torch.Tensor | None]], rank: int, dtype: str, bucket_bytes: int
                   ) -> tuple[list[bytes] | None, dict[str, float]]:
    """Cast ``named`` (`gathered_named_params`) to ``dtype`` and pack it into safetensors buckets of about
    ``bucket_bytes`` each (`base.weight_buckets.serialize_buckets`).

    Ranks > 0 only drain ``named`` (under ZeRO-3 that is their part in each gather), convert nothing and
    return ``(None, {})``.

    Returns:
        ``(buckets, metrics)`` on rank 0: ``weights/export_seconds`` (gather, cast and packing),
        ``weights/bytes`` (bucket bytes), ``weights/buckets``.

    Raises:
        ValueError: ``dtype`` not in `EXPORT_DTYPES`.
    """
    import torch

    from base.weight_buckets import serialize_buckets  # the format the engine loads

    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"weight export dtype {dtype!r} is not one of {EXPORT_DTYPES}")
    t0 = time.perf_counter()
    if rank != 0:
        for _ in named:  # take part in ZeRO-3 gathers
            pass
        return None, {}
    dt = getattr(torch, dtype)
    buckets = serialize_buckets(((n, t.to(dt)) for n, t in named), bucket_bytes)
    return buckets, {"weights/export_seconds": time.perf_counter() - t0,
                     "weights/bytes": float(sum(len(b) for b in buckets)),
                     "weights/buckets": float(len(buckets))}


def broadcast(group: WeightGroup | None, version: int, buckets: list[bytes], metrics: dict[str, float],
              started: float) -> dict[str, float]:
    """Send ``buckets`` of policy ``version`` from rank 0 over ``group``, within the group's timeout counted from
    ``started`` (a ``time.monotonic()`` taken before the export, so export and send share it; at least 1 s is
    left for the send).

    Returns:
        ``metrics`` (the export's) plus ``weights/broadcast_seconds``.

    Raises:
        RuntimeError: ``group`` is None (rank 0 joined none, or its last broadcast failed).
        TimeoutError / RuntimeError: the broadcast timed out or lost a rollout worker (`WeightGroup.send`).
    """
    if group is None:
        raise RuntimeError("learner rank 0 is in no weight group (none joined, or its last broadcast failed)")
    t1 = time.perf_counter()
    group.send(version, buckets, timeout_s=max(1.0, group.timeout_s - (time.monotonic() - started)))
    return {**metrics, "weights/broadcast_seconds": time.perf_counter() - t1}
