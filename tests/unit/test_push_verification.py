"""Verified weight pushes, their pure parts: the checksum a push is sealed with where it is made (damage found on
the bytes received, nothing loaded), the canary comparison against the sentinel's bounds, and `WeightSync`'s
policy for a worker that fails (push again once, then replace, then stop)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save

from base.weight_buckets import (WeightChecksumError, iter_buckets, seal, serialize_buckets,
                                 verify_checksums)
from base.weight_delta import DeltaReceiver, to_buckets
from orchestrator.config import SentinelConfig
from orchestrator.sentinel import gap_within
from orchestrator.weight_sync import WeightSync
from orchestrator.weight_verify import Verdict, canary_gap
from orchestrator.weights.object_store import ObjectStoreWeights


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(64, 32, generator=g).to(torch.bfloat16) for i in range(6)}


def test_a_sealed_push_verifies_and_loads_the_same_tensors():
    t = _tensors()
    buckets = serialize_buckets(t.items(), 8 << 10)  # 4 KiB tensors, two per bucket
    assert len(buckets) == 3 + 1  # three buckets, then the manifest
    body = verify_checksums(buckets, "rollout worker 0", 1)
    assert body == buckets[:-1]
    got = dict(iter_buckets(buckets))  # the manifest holds no tensor
    assert got.keys() == t.keys() and all(torch.equal(got[k], t[k]) for k in t)


@pytest.mark.parametrize("where", ["first", "last"])
def test_one_flipped_byte_in_any_bucket_is_refused_naming_worker_version_and_bucket(where):
    buckets = serialize_buckets(_tensors().items(), 8 << 10)
    i = 0 if where == "first" else len(buckets) - 2
    bad = bytearray(buckets[i])
    bad[len(bad) // 2] ^= 0x10  # one bit of tensor data
    damaged = [*buckets[:i], bytes(bad), *buckets[i + 1:]]
    with pytest.raises(WeightChecksumError, match=rf"^rollout worker 3: weight push of policy version 7, bucket {i} "
                       r"\(\d+ bytes\): checksum [0-9a-f]{32} differs from the sender's [0-9a-f]{32}"):
        verify_checksums(damaged, "rollout worker 3", 7)


def test_a_lost_or_extra_bucket_is_refused():
    buckets = serialize_buckets(_tensors().items(), 8 << 10)
    with pytest.raises(WeightChecksumError, match="has 2 buckets, its manifest lists 3"):
        verify_checksums([buckets[0], buckets[2], buckets[-1]], "rollout worker 0", 2)
    with pytest.raises(WeightChecksumError, match="has 4 buckets, its manifest lists 3"):
        verify_checksums([*buckets[:-1], buckets[0], buckets[-1]], "rollout worker 0", 2)


def test_an_unsealed_push_passes_unchecked():
    plain = [save({"w": torch.ones(3)})]
    assert verify_checksums(plain, "rollout worker 0", 1) == plain
    assert verify_checksums([], "rollout worker 0", 1) == []


def test_a_sealed_delta_push_verifies_and_the_receiver_reconstructs_it():
    t = _tensors()
    push = seal(to_buckets(4, None, t, {n: {"kind": "full", "shape": list(v.shape), "dtype": "bfloat16"}
                                        for n, v in t.items()}, 8 << 10))
    out = DeltaReceiver().receive(4, verify_checksums(push, "rollout worker 0", 4), timeout_s=1)
    got = dict(iter_buckets(out))
    assert all(torch.equal(got[k], t[k]) for k in t)


def test_canary_gap_is_the_sentinels_gap_over_every_token():
    learner, engine = [-1.0, -2.0, -0.5], [-1.2, -2.0, -0.4]
    d = [0.2, 0.0, -0.1]
    g = canary_gap(learner, engine)
    assert g["tokens"] == 3
    assert g["mean_abs_logprob_diff"] == pytest.approx(0.1)
    assert g["mismatch_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 3)
    with pytest.raises(ValueError, match="learner scored 3 tokens, the engine 2"):
        canary_gap(learner, engine[:2])


def test_canary_bounds_pass_bf16_noise_and_fail_a_corrupted_tensor():
    bounds = SentinelConfig()
    g = torch.Generator().manual_seed(1)
    learner = (-torch.rand(31, generator=g) * 6).tolist()
    bf16 = [x + 0.01 * float(torch.randn(1, generator=g)) for x in learner]  # ~1e-2 nats/token: bf16 vs fp32
    corrupted = [x + 2.0 * float(torch.randn(1, generator=g)) for x in learner]  # a wrong tensor: >> 1 nat
    assert gap_within(canary_gap(learner, learner), bounds)
    assert gap_within(canary_gap(learner, bf16), bounds)
    assert not gap_within(canary_gap(learner, corrupted), bounds)


class _Rollout:
    def __init__(self) -> None:
        self.incarnation, self.replaced, self.slots = {0: 0, 1: 0}, [], {0: "actor 0", 1: "actor 1"}

    def replace(self, slot: int) -> str:
        self.replaced.append(slot)
        self.incarnation[slot] += 1
        return "replaced"


class _Learner:
    def version_at_next_call(self, known: int) -> int:
        return known


class _Canary:
    """Stands in for `CanaryChecks`: hands out the verdicts it is given."""

    def __init__(self) -> None:
        self.verdicts, self.expected, self.started = [], [], []

    def poll(self):
        out, self.verdicts = self.verdicts, []
        return out

    def expect(self, version):
        self.expected.append(version)

    def metrics(self):
        return {}


def test_a_failing_worker_is_pushed_again_then_replaced_then_the_run_stops():
    rollout = _Rollout()
    sync = WeightSync(ObjectStoreWeights(), _Learner(), rollout, "bfloat16", "t", gpus=False)
    sync.canary, sent = _Canary(), []

    def send_to(slot, version):
        sync.fallback.last_export = (version, None)
        sent.append((slot, version))
        return f"ref{len(sent)}"

    sync.fallback.send_to, sync.newest = send_to, 5
    sync.canary.verdicts = [Verdict(1, 0, 5, False, "canary off"), Verdict(0, 0, 5, True)]
    sync.retire()
    assert sent == [(1, 5)] and rollout.replaced == [] and sync.canary.expected == [5]
    assert [(p.version, list(p.refs), p.check) for p in sync.pushes] == [(5, [1], True)]
    sync.pushes = []  # (stand-in refs: nothing to wait for)
    sync.canary.verdicts = [Verdict(1, 0, 5, False, "canary off")]
    sync.retire()
    assert sent == [(1, 5), (1, 5)] and rollout.replaced == [1]
    m = sync.verify_metrics()
    assert (m["weights/verify_failures_total"], m["weights/repushes_total"], m["weights/verify_replaced_total"]) \
        == (2.0, 1.0, 1.0)
    sync.pushes = []
    sync.canary.verdicts = [Verdict(1, 0, 5, False, "stale verdict of the old actor")]
    sync.retire()  # the replaced actor's verdict is ignored
    assert sync.verify_failures == 2
    sync.pushes = []
    sync.canary.verdicts = [Verdict(1, 1, 5, False, "canary off again")]
    with pytest.raises(RuntimeError, match=r"^rollout worker 1 failed verification of the weights of policy version 5 "
                       r"after a re-push and a replacement: canary off again"):
        sync.retire()


def test_a_pass_clears_a_workers_failures():
    sync = WeightSync(ObjectStoreWeights(), _Learner(), _Rollout(), "bfloat16", "t", gpus=False)
    sync.canary = _Canary()
    sync.fallback.send_to = lambda slot, version: setattr(sync.fallback, "last_export", (version, None)) or "ref"
    for ok in (False, True, False, True, False):  # never two failures in a row: never replaced
        sync.canary.verdicts = [Verdict(0, 0, 3, ok, "x")]
        sync.retire()
        sync.pushes = []
    assert sync.verify_failures == 3 and sync.repushes == 3 and sync.replaced == 0


def test_a_checksum_failure_in_a_receipt_is_a_failed_verification_not_a_fallback(monkeypatch):
    import ray

    from orchestrator.weight_sync import Push

    sync = WeightSync(ObjectStoreWeights(), _Learner(), _Rollout(), "bfloat16", "t", gpus=False)
    sync.canary, sent = _Canary(), []
    sync.fallback.send_to = lambda slot, version: (setattr(sync.fallback, "last_export", (version, None)),
                                                   sent.append((slot, version)))[0] or "ref"
    cause = WeightChecksumError("rollout worker 1: weight push of policy version 4, bucket 0 (9 bytes): checksum ...")
    err = ray.exceptions.RayTaskError("RolloutWorker.receive_weights", "Traceback ...", cause).as_instanceof_cause()

    def get(ref, timeout=None):
        raise err

    monkeypatch.setattr(ray, "get", get)
    for transport in ("object_store", "collective"):
        sync.pushes, sent[:] = [], []
        assert sync._receipt(Push(4, 0.0, {1: "r"}, transport, True), 1, "r") == 0.0
        assert sent == [(1, 4)] and sync.fallbacks == 0  # pushed again once, not counted as a broadcast fallback
        assert [(p.version, list(p.refs)) for p in sync.pushes] == [(4, [1])]
        sync.failures.clear()
    assert sync.verify_failures == 2 and sync.repushes == 2


def test_canary_metrics_per_interval_reset_and_run_totals_do_not():
    from orchestrator.weight_verify import CanaryChecks

    c = object.__new__(CanaryChecks)
    c.passed, c.seconds, c.max_diff, c.run_seconds, c.run_max_diff = 3, 0.5, 0.02, 1.5, 0.04
    assert c.metrics() == {"weights/verified_total": 3.0, "weights/verify_seconds": 0.5,
                           "weights/verify_max_abs_logprob_diff": 0.02}
    assert c.metrics()["weights/verify_seconds"] == 0.0  # since the last call
    assert c.metrics(run=True) == {"weights/verified_total": 3.0, "weights/verify_seconds": 1.5,
                                   "weights/verify_max_abs_logprob_diff": 0.04}
    assert c.metrics(run=True)["weights/verify_seconds"] == 1.5  # a summary read resets nothing
