"""`SnapshotStore`: a snapshot is complete once every rank sent its part; older ones are dropped."""

from __future__ import annotations

import pytest

from learner.snapshots import SnapshotStore


def test_a_snapshot_is_complete_only_with_every_ranks_part_and_older_ones_go():
    store = SnapshotStore(2)
    assert store.latest() == -1
    assert store.put(0, 1, {"deepspeed/mp_rank_00_model_states.pt": b"m1", "rng_rank0.pt": b"r0"}) == -1
    assert store.put(1, 1, {"rng_rank1.pt": b"r1"}) == 1
    assert store.put(0, 2, {"deepspeed/mp_rank_00_model_states.pt": b"m2", "rng_rank0.pt": b"r0"}) == 1
    with pytest.raises(KeyError, match="no complete learner snapshot of version 2 \\(complete: 1\\)"):
        store.names(2)
    # version 1 is still whole while 2 is partial: a rank that dies now restores from it
    assert store.files(1, ["deepspeed/mp_rank_00_model_states.pt", "rng_rank1.pt"]) == {
        "deepspeed/mp_rank_00_model_states.pt": b"m1", "rng_rank1.pt": b"r1"}
    assert store.put(1, 2, {"rng_rank1.pt": b"r1"}) == 2
    assert sorted(store.parts) == [2]  # version 1 dropped once 2 is complete
    assert store.names(2) == ["deepspeed/mp_rank_00_model_states.pt", "rng_rank0.pt", "rng_rank1.pt"]
    assert store.nbytes() == 6


def test_bad_ranks_are_refused_naming_the_range():
    with pytest.raises(ValueError, match="num_ranks >= 1, got 0"):
        SnapshotStore(0)
    with pytest.raises(ValueError, match="rank 2; this store holds ranks 0..1"):
        SnapshotStore(2).put(2, 1, {})
    with pytest.raises(KeyError, match="lacks|'x'"):
        store = SnapshotStore(1)
        store.put(0, 1, {"a": b""})
        store.files(1, ["x"])


def test_a_snapshot_copy_does_not_change_with_the_training_state_and_round_trips_exactly():
    import collections
    import pickle

    import torch

    from learner.snapshots import HostTensor, MemoryCheckpointEngine, nbytes

    w = torch.ones(4)
    bf = torch.tensor([[1.5, -2.25], [3.0, 1e-3]], dtype=torch.bfloat16).t()  # bf16 (no numpy dtype), not contiguous
    state = {"module": collections.OrderedDict(w=w), "step": 3, "groups": [bf, torch.tensor(7)]}
    mem = MemoryCheckpointEngine(base=None)
    mem.save(state, "/ckpt/deepspeed/../deepspeed/mp_rank_00_model_states.pt")
    w.add_(1.0)  # the next optimizer step
    saved = mem.saved["/ckpt/deepspeed/mp_rank_00_model_states.pt"]
    assert isinstance(saved["module"]["w"], HostTensor) and type(saved["module"]) is collections.OrderedDict
    assert saved["step"] == 3 and nbytes(saved) == 4 * 4 + 4 * 2 + 8
    # what the store sends back (pickled, as Ray does) loads as the state it was
    served = MemoryCheckpointEngine(base=None, loaded={"/ckpt/deepspeed/x.pt": pickle.loads(pickle.dumps(saved))})
    back = served.load("/ckpt/./deepspeed/x.pt")
    assert back["module"]["w"].tolist() == [1.0] * 4 and back["step"] == 3
    assert back["groups"][0].dtype == torch.bfloat16 and torch.equal(back["groups"][0], bf)
    assert back["groups"][1].shape == () and back["groups"][1].item() == 7
    back["module"]["w"].add_(1.0)  # writable, and a copy of what the store holds
    assert saved["module"]["w"].array.tolist() == [1.0] * 4
