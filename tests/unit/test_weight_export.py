"""The push side of weight sync (`learner.weight_export`): buckets in the rollout dtype that load back to the
model's tensors, a refused dtype, and rank 0's broadcast within the group's timeout (a group that is missing
or fails raises, and `LearnerWorker.broadcast_weights` drops a failed group)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from base.weight_buckets import iter_buckets
from learner import weight_export
from learner.worker import LearnerWorker


def _module() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_rank_0_buckets_hold_every_tensor_in_the_rollout_dtype():
    module = _module()
    named = weight_export.gathered_named_params(module, rank=0, zero_stage=1)
    buckets, metrics = weight_export.export_buckets(named, 0, "bfloat16", bucket_bytes=40)
    got = dict(iter_buckets(buckets))
    assert sorted(got) == sorted(n for n, _ in module.named_parameters())
    for n, p in module.named_parameters():
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], p.detach().to(torch.bfloat16))
    assert len(buckets) > 1 and metrics["weights/buckets"] == len(buckets)
    assert metrics["weights/bytes"] == sum(len(b) for b in buckets) and metrics["weights/export_seconds"] >= 0


def test_an_unknown_export_dtype_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"'bf16' is not one of \('bfloat16'"):
        weight_export.export_buckets(iter([]), 0, "bf16", 1 << 20)


class _Group:
    timeout_s = 30.0

    def __init__(self, fail: bool = False) -> None:
        self.fail, self.sent = fail, []

    def send(self, version, buckets, timeout_s):
        if self.fail:
            raise TimeoutError("peer lost")
        self.sent.append((version, buckets, timeout_s))
        return sum(map(len, buckets))


def test_broadcast_shares_the_timeout_with_the_export():
    group = _Group()
    out = weight_export.broadcast(group, 7, [b"ab"], {"weights/bytes": 2.0}, time.monotonic() - 10.0)
    (version, buckets, timeout_s), = group.sent
    assert version == 7 and buckets == [b"ab"] and 19.0 < timeout_s <= 20.0  # 30 s less the 10 s already spent
    assert out["weights/bytes"] == 2.0 and out["weights/broadcast_seconds"] >= 0
    weight_export.broadcast(group, 8, [b"ab"], {}, time.monotonic() - 100.0)
    assert group.sent[-1][2] == 1.0  # past the timeout: at least 1 s to fail cleanly in the send
    with pytest.raises(RuntimeError, match="no weight group"):
        weight_export.broadcast(None, 7, [b"ab"], {}, time.monotonic())


def test_the_worker_drops_a_weight_group_whose_broadcast_failed():
    me = SimpleNamespace(rank=0, cfg=SimpleNamespace(zero_stage=2, lora=None), engine=SimpleNamespace(module=_module()),
                         weight_group=_Group(fail=True))
    me._gathered_named_params = lambda adapters_only=False: LearnerWorker._gathered_named_params(me, adapters_only)
    me.export_weights = lambda dtype, bucket_bytes: LearnerWorker.export_weights(me, dtype, bucket_bytes)
    with pytest.raises(TimeoutError):
        LearnerWorker.broadcast_weights(me, 1, "float32", 1 << 20)
    assert me.weight_group is None
    with pytest.raises(RuntimeError, match="no weight group"):
        LearnerWorker.broadcast_weights(me, 2, "float32", 1 << 20)


def test_adapters_only_yields_the_lora_tensors_under_peft_adapter_file_names():
    lora = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 2, bias=False)})
    module = torch.nn.ModuleDict({"q_proj": torch.nn.ModuleDict({"base_layer": torch.nn.Linear(2, 2),
                                                                  "lora_A": lora})})
    got = dict(weight_export.gathered_named_params(module, rank=0, zero_stage=2, adapters_only=True))
    assert list(got) == ["q_proj.lora_A.weight"] and torch.equal(got["q_proj.lora_A.weight"], lora["default"].weight)
