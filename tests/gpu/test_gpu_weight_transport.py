"""The NCCL backend of the collective weight push: two processes on two GPUs. Skipped without 2 GPUs
(NCCL refuses two ranks on one device); the gloo path of the same class runs in tests/integration."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from ports import free_port

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def _member(rank: int, port: int, buckets: list[bytes], out) -> None:
    import torch

    from base.weight_group import WeightGroup

    torch.cuda.set_device(rank)
    g = WeightGroup("nccl", "127.0.0.1", port, rank, 2, 60.0, "test/nccl")
    out.put(("sent", g.send(7, buckets)) if rank == 0 else ("got", g.receive()))


def test_nccl_broadcast_of_buckets_between_two_gpus():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    port = free_port()
    buckets = [bytes(range(256)) * 1000, b"relayrl" * 333]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_member, args=(r, port, buckets, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert results["sent"] == sum(len(b) for b in buckets)
    assert results["got"] == (7, buckets)
