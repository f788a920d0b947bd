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


def test_a_snapshot_copy_does_not_change_with_the_training_state():
    import collections

    import torch

    from learner.snapshots import MemoryCheckpointEngine, cpu_copy, nbytes

    w = torch.ones(4)
    state = {"module": collections.OrderedDict(w=w), "step": 3, "groups": [torch.zeros(2, dtype=torch.bfloat16)]}
    mem = MemoryCheckpointEngine(base=None)
    mem.save(state, "/ckpt/deepspeed/../deepspeed/mp_rank_00_model_states.pt")
    w.add_(1.0)  # the next optimizer step
    saved = mem.saved["/ckpt/deepspeed/mp_rank_00_model_states.pt"]
    assert saved["module"]["w"].tolist() == [1.0] * 4 and type(saved["module"]) is collections.OrderedDict
    assert saved["step"] == 3 and nbytes(saved) == 4 * 4 + 2 * 2
    served = MemoryCheckpointEngine(base=None, loaded={"/ckpt/deepspeed/x.pt": cpu_copy(state)})
    assert served.load("/ckpt/./deepspeed/x.pt")["step"] == 3
