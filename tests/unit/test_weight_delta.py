"""Delta weight pushes (`base.weight_delta`): encode/apply reconstruct the new version bit for bit (bf16, fp16, fp32,
random sparse changes, all-changed and unchanged tensors, NaN/-0.0 bit patterns), through the bucket format too,
and the receiving end refuses a delta against the wrong base with one line."""

from __future__ import annotations

import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from base.weight_buckets import iter_buckets, serialize_buckets
from base.weight_delta import DeltaReceiver, apply, digest, encode, from_buckets, header, to_buckets

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _bits_equal(a: dict, b: dict) -> None:
    """Same names, shapes, dtypes and raw bits (``torch.equal`` would call NaN != NaN and -0.0 == 0.0)."""
    assert sorted(a) == sorted(b)
    for n in a:
        assert a[n].shape == b[n].shape and a[n].dtype == b[n].dtype, n
        w = {1: torch.int8, 2: torch.int16, 4: torch.int32}[a[n].element_size()]
        assert torch.equal(a[n].contiguous().view(-1).view(w), b[n].contiguous().view(-1).view(w)), n


def _changed(t: torch.Tensor, frac: float, gen: torch.Generator) -> torch.Tensor:
    """``t`` with a random ``frac`` of its elements moved by a small step (a typical optimizer update)."""
    out = t.clone()
    flat = out.view(-1)
    idx = torch.randperm(flat.numel(), generator=gen)[: int(frac * flat.numel())]
    flat[idx] = (flat[idx].float() * 1.01 + 1e-3).to(t.dtype)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_all_changed_and_unchanged_tensors_round_trip_bit_exactly(dtype):
    gen = torch.Generator().manual_seed(0)
    prev = {"sparse": torch.randn(64, 96, generator=gen).to(dtype), "dense": torch.randn(300, generator=gen).to(dtype),
            "same": torch.randn(7, 5, generator=gen).to(dtype), "scalar": torch.tensor(0.5, dtype=dtype)}
    new = {"sparse": _changed(prev["sparse"], 0.02, gen), "dense": prev["dense"] + 1.0, "same": prev["same"].clone(),
           "scalar": torch.tensor(-0.25, dtype=dtype)}
    payload, entries = encode(prev, new)
    assert entries["sparse"]["kind"] == "xor_sparse" and entries["dense"]["kind"] == "full"
    assert "same" not in entries and "same" not in payload  # no change: nothing sent
    assert entries["sparse"]["changed"] == int((new["sparse"] != prev["sparse"]).sum())
    sparse_bytes = payload["sparse"].numel()
    assert sparse_bytes < 0.25 * new["sparse"].numel() * new["sparse"].element_size()
    _bits_equal(apply(prev, payload, entries), new)
    assert prev["sparse"].data_ptr() != new["sparse"].data_ptr()
    # through the wire format (small buckets: several of them)
    version, base, _, p2, e2 = from_buckets(to_buckets(7, 6, payload, entries, bucket_bytes=1 << 10))
    assert (version, base) == (7, 6)
    _bits_equal(apply(prev, p2, e2), new)


def test_special_bit_patterns_survive():
    """NaNs with payloads, -0.0 against 0.0 and subnormals differ in bits only: a delta keeps them."""
    prev = {"w": torch.zeros(1000, dtype=torch.float32)}
    new = {"w": prev["w"].clone()}
    new["w"][0] = -0.0
    new["w"][1] = float("nan")
    new["w"].view(torch.int32)[2] = 0x7FC00123  # a NaN with a payload
    new["w"][3] = 1e-45  # subnormal
    payload, entries = encode(prev, new)
    assert entries["w"]["kind"] == "xor_sparse" and entries["w"]["changed"] == 4
    _bits_equal(apply(prev, payload, entries), new)
    assert digest(apply(prev, payload, entries)) == digest(new) != digest(prev)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
       frac=st.floats(0.0, 1.0), dense_frac=st.floats(0.01, 1.0), seed=st.integers(0, 2**31 - 1))
def test_random_changes_round_trip_bit_exactly(dtype, shape, frac, dense_frac, seed):
    gen = torch.Generator().manual_seed(seed)
    prev = {"a": torch.randn(*shape, generator=gen).to(dtype), "b": torch.randn(5, generator=gen).to(dtype)}
    new = {"a": _changed(prev["a"], frac, gen), "b": prev["b"]}
    payload, entries = encode(prev, new, dense_frac=dense_frac)
    _bits_equal(apply(prev, payload, entries), new)
    changed = int((new["a"].view(-1).float() != prev["a"].view(-1).float()).sum())
    if changed > dense_frac * new["a"].numel():
        assert entries["a"]["kind"] == "full"
    assert ("a" in entries) == (changed > 0)


def test_a_new_name_goes_whole_and_a_missing_one_is_refused():
    prev = {"a": torch.ones(4)}
    payload, entries = encode(prev, {"a": torch.ones(4), "b": torch.zeros(3)})
    assert entries == {"b": {"kind": "full", "shape": [3], "dtype": "float32"}}
    with pytest.raises(ValueError, match=r"tensors \['a'\] of the base are missing from the new version"):
        encode(prev, {"b": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"dense_frac = 0 must be in \(0, 1\]"):
        encode(prev, prev, dense_frac=0)


def test_shape_or_dtype_mismatch_is_one_line_naming_the_tensor():
    prev = {"w": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=r"tensor 'w': base has shape \[4, 4\] torch.float32, the delta is for "
                                         r"\[16\] float32"):
        encode(prev, {"w": torch.zeros(16)})
    new = {"w": prev["w"].clone()}
    new["w"][0, 0] = 1.0
    payload, entries = encode(prev, new)
    with pytest.raises(ValueError, match=r"tensor 'w': base has shape \[2, 8\] .* \(send a full push\)"):
        apply({"w": torch.zeros(2, 8)}, payload, entries)
    with pytest.raises(ValueError, match=r"tensor 'w': base has shape \[4, 4\] torch.bfloat16"):
        apply({"w": torch.zeros(4, 4, dtype=torch.bfloat16)}, payload, entries)
    with pytest.raises(ValueError, match=r"tensor 'w': the base has no such tensor"):
        apply({}, payload, entries)


def _receiver_push(version, base, prev, new, bucket_bytes=1 << 20):
    if base is None:
        return to_buckets(version, None, new, {n: {"kind": "full", "shape": list(t.shape),
                                                   "dtype": str(t.dtype).removeprefix("torch.")}
                                               for n, t in new.items()}, bucket_bytes)
    return to_buckets(version, base, *encode(prev, new), bucket_bytes)


def test_receiver_turns_pushes_into_plain_buckets_of_the_exact_weights():
    gen = torch.Generator().manual_seed(1)
    v = [{"w": torch.randn(50, 20, generator=gen).to(torch.bfloat16), "b": torch.randn(20, generator=gen)}]
    for _ in range(3):
        v.append({"w": _changed(v[-1]["w"], 0.05, gen), "b": v[-1]["b"]})
    r = DeltaReceiver()
    out = r.receive(1, _receiver_push(1, None, None, v[0]), timeout_s=1)
    assert header(out[0]) is None  # plain buckets: what the engine loads
    _bits_equal(dict(iter_buckets(out)), v[0])
    for i in (1, 2, 3):
        push = _receiver_push(i + 1, i, v[i - 1], v[i])
        assert sum(map(len, push)) < 0.3 * sum(map(len, serialize_buckets(v[i].items(), 1 << 20)))
        _bits_equal(dict(iter_buckets(r.receive(i + 1, push, timeout_s=1))), v[i])
        assert r.digest() == digest(v[i])
    # an old push arriving late: nothing to load
    assert r.receive(3, _receiver_push(3, 2, v[1], v[2]), timeout_s=1) is None


def test_receiver_refuses_a_delta_against_another_base_in_one_line():
    a = {"w": torch.zeros(10)}
    b = {"w": torch.ones(10)}
    fresh = DeltaReceiver()  # a restarted worker: holds nothing, refuses at once (no wait)
    with pytest.raises(RuntimeError, match=r"version 5 applies to version 4, but this worker holds nothing; it needs "
                                           "a full push"):
        fresh.receive(5, _receiver_push(5, 4, a, b), timeout_s=30)
    r = DeltaReceiver()
    r.receive(2, _receiver_push(2, None, None, a), timeout_s=1)
    with pytest.raises(RuntimeError, match="applies to version 3, but this worker holds version 2"):
        r.receive(4, _receiver_push(4, 3, a, b), timeout_s=0.2)  # version 3 never comes
    plain = serialize_buckets(b.items(), 1 << 20)  # a plain push (the object-store fallback) drops the base
    assert r.receive(3, plain, timeout_s=1) is plain and r.digest() is None
    with pytest.raises(RuntimeError, match="holds version 3 as a plain push"):
        r.receive(4, _receiver_push(4, 3, b, a), timeout_s=1)


def test_receiver_waits_for_the_base_of_a_delta_that_arrived_first():
    a, b, c = ({"w": torch.full((100,), float(x))} for x in (1, 2, 3))
    r = DeltaReceiver()
    r.receive(1, _receiver_push(1, None, None, a), timeout_s=1)
    got = {}
    th = threading.Thread(target=lambda: got.setdefault("v3", r.receive(3, _receiver_push(3, 2, b, c), timeout_s=30)))
    th.start()
    r.receive(2, _receiver_push(2, 1, a, b), timeout_s=1)
    th.join(30)
    _bits_equal(dict(iter_buckets(got["v3"])), c)
    assert r.version == 3


def test_a_full_push_of_the_version_a_plain_push_brought_becomes_the_base_without_a_reload():
    """A new worker gets the current weights as a plain object-store push; the delta transport's first push to
    it may carry that same version in full: nothing to load, but the next delta applies to it."""
    a, b = {"w": torch.zeros(64)}, {"w": torch.arange(64.0)}
    r = DeltaReceiver()
    r.receive(3, serialize_buckets(a.items(), 1 << 20), timeout_s=1)
    assert r.receive(3, _receiver_push(3, None, None, a), timeout_s=1) is None and r.digest() == digest(a)
    _bits_equal(dict(iter_buckets(r.receive(4, _receiver_push(4, 3, a, b), timeout_s=1))), b)


def test_bytes_that_are_no_safetensors_pass_through_to_the_engine_unchanged():
    r = DeltaReceiver()
    junk = [b"\x05\x00\x00\x00\x00\x00\x00\x00{junk", b"x"]
    assert header(junk[0]) is None and r.receive(1, junk, timeout_s=1) is junk


def test_a_delta_that_does_not_fit_its_base_is_refused_in_one_line():
    """The changed elements' count and positions are checked against the base before anything is applied."""
    import zlib

    prev = {"w": torch.zeros(64, dtype=torch.bfloat16)}
    new = {"w": prev["w"].clone()}
    new["w"][[3, 40]] = 1.0
    payload, entries = encode(prev, new)
    assert entries["w"] == {"kind": "xor_sparse", "changed": 2, "shape": [64], "dtype": "bfloat16"}
    with pytest.raises(ValueError, match=r"tensor 'w': \d+ bytes for 3 changed elements of 6 bytes each"):
        apply(prev, payload, {"w": {**entries["w"], "changed": 3}})
    # one change at position 70 of a 64-element tensor: gap 70 (int32), XOR 1 (int16), each byte plane by plane
    raw = bytes([70, 0, 0, 0, 1, 0])
    bad = {"w": torch.frombuffer(bytearray(zlib.compress(raw)), dtype=torch.uint8)}
    with pytest.raises(ValueError, match=r"tensor 'w': a changed position 70 past its 64 elements"):
        apply(prev, bad, {"w": {**entries["w"], "changed": 1}})
