"""Full-model tensors only on the rank that needs them (`LearnerWorker._gathered_named_params`): rank 0 gets
every parameter as a full CPU tensor; under ZeRO-3 ranks > 0 take part in each gather but keep no copy; under
ZeRO-1/2 ranks > 0 iterate nothing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from learner.worker import LearnerWorker


def _rank(rank: int, zero_stage: int) -> SimpleNamespace:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    return SimpleNamespace(rank=rank, cfg=SimpleNamespace(zero_stage=zero_stage, lora=None),
                           engine=SimpleNamespace(module=module))


@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_rank_0_gets_every_full_tensor(zero_stage):
    me = _rank(0, zero_stage)
    got = dict(LearnerWorker._gathered_named_params(me))
    assert list(got) == [n for n, _ in me.engine.module.named_parameters()]
    for n, p in me.engine.module.named_parameters():
        assert torch.equal(got[n], p.detach())


def test_zero3_ranks_above_0_join_every_gather_but_keep_no_copy():
    me = _rank(1, 3)
    got = list(LearnerWorker._gathered_named_params(me))
    assert [n for n, _ in got] == [n for n, _ in me.engine.module.named_parameters()]  # one gather per parameter
    assert all(t is None for _, t in got)


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero12_ranks_above_0_get_nothing(zero_stage):
    assert list(LearnerWorker._gathered_named_params(_rank(1, zero_stage))) == []


def test_export_on_a_rank_above_0_returns_nothing_and_converts_nothing():
    me = _rank(1, 3)
    me._gathered_named_params = lambda adapters_only=False: LearnerWorker._gathered_named_params(me, adapters_only)
    assert LearnerWorker.export_weights(me, "bfloat16", 1 << 20) == (None, {})

