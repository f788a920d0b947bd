"""On resume from an object store each learner rank fetches only the checkpoint files it reads, once per node.

The file lists are those of real 2-rank DeepSpeed 0.19.8 checkpoints (ZeRO 0-3, fp32 and bf16, saved as
`LearnerCheckpoints.save_checkpoint` saves them). A 2-process check at the time of writing loaded each rank
from a dir holding only its `rank_checkpoint_files` and continued bit-identically to the engine that saved.
The fetches run against a real S3-compatible server (moto on loopback).
"""

from __future__ import annotations

import io
import logging
import os
import threading
from types import SimpleNamespace

import pytest

from base import storage
from learner.checkpointing import LearnerCheckpoints, rank_checkpoint_files, shared_download_dir

D = "deepspeed/"
TOOLS = ["zero_to_fp32.py", "zero_to_torch.py"]  # DeepSpeed copies its recovery scripts next to a ZeRO checkpoint
RNG = ["rng_rank0.pt", "rng_rank1.pt"]


def _present(stage: int, bf16: bool) -> list[str]:
    """The files of a real 2-rank checkpoint dir (``<step>/learner``) written under ``stage`` / ``bf16``."""
    if stage == 0:
        return [D + "mp_rank_00_model_states.pt", *RNG]
    opt = "bf16_" if bf16 else ""
    optim = [f"{D}{opt}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    if stage == 3:
        return [*optim, *(f"{D}zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)), *RNG, *TOOLS]
    return [*optim, D + "mp_rank_00_model_states.pt", *RNG, *TOOLS]


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_the_model_states_its_own_optimizer_partition_and_its_rng(stage, bf16, rank):
    other = 1 - rank
    opt = "bf16_" if bf16 else ""
    model = f"{D}zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if stage == 3 else D + "mp_rank_00_model_states.pt"
    optim = [f"{D}{opt}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] if stage > 0 else []
    names = rank_checkpoint_files(stage, rank, bf16, _present(stage, bf16))
    assert names == [model, *optim, f"rng_rank{rank}.pt"]
    assert not [n for n in names if f"rank_{other}_" in n or f"rank{other}" in n]  # nothing of the other rank's


def test_a_checkpoint_without_an_expected_file_is_fetched_whole():
    present = _present(2, False)
    without = [n for n in present if n != D + "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert rank_checkpoint_files(2, 0, False, without) is not None
    assert rank_checkpoint_files(2, 1, False, without) is None
    assert rank_checkpoint_files(2, 1, True, present) is None  # written in fp32, loaded in bf16: other names
    assert rank_checkpoint_files(2, 2, False, present) is None  # a rank the checkpoint has no part of


@pytest.mark.parametrize("stage, rank, match", [(4, 0, "zero_stage must be 0, 1, 2 or 3, got 4"),
                                                (2, -1, "rank must be >= 0, got -1")])
def test_bad_arguments_are_named(stage, rank, match):
    with pytest.raises(ValueError, match=match):
        rank_checkpoint_files(stage, rank, False, [])


def _upload_checkpoint(uri: str, names: list[str]) -> dict[str, bytes]:
    """Write each of ``names`` under ``uri`` (RNG files as real torch RNG states); returns the contents."""
    import torch

    data = {}
    for n in names:
        if n.startswith("rng_rank"):
            buf = io.BytesIO()
            torch.save({"torch": torch.get_rng_state()}, buf)
            data[n] = buf.getvalue()
        else:
            data[n] = os.urandom(2000 + len(data))
        storage.write_bytes(storage.join(uri, n), data[n])
    return data


def test_ranks_of_one_node_fetch_a_shared_file_once(s3_bucket, tmp_path):
    uri = storage.join(s3_bucket, "ckpt", "learner")
    data = _upload_checkpoint(uri, _present(2, False))
    assert storage.files_under(uri) == sorted(data)
    local, got, errors = str(tmp_path / "node"), {}, []
    start = threading.Barrier(2)

    def rank(r: int) -> None:
        try:
            names = rank_checkpoint_files(2, r, False, storage.files_under(uri))
            start.wait(30)
            got[r] = storage.fetch_files(uri, names, local, timeout_s=60)
        except Exception as e:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    fetched = got[0][0] + got[1][0]
    shared = D + "mp_rank_00_model_states.pt"
    assert fetched.count(shared) == 1  # whichever rank came first fetched it; the other found it
    assert sorted(n for n in fetched if n != shared) == sorted(
        [D + "zero_pp_rank_0_mp_rank_00_optim_states.pt", D + "zero_pp_rank_1_mp_rank_00_optim_states.pt", *RNG])
    assert got[0][1] + got[1][1] == sum(len(data[n]) for n in fetched)
    files = sorted(os.path.relpath(os.path.join(d, f), local).replace(os.sep, "/")
                   for d, _, fs in os.walk(local) for f in fs if not f.endswith(".lock"))
    assert files == sorted(fetched)  # no other rank's extra files, no partial downloads left
    for n in files:
        assert open(os.path.join(local, n), "rb").read() == data[n], n
    assert storage.fetch_files(uri, [shared], local, timeout_s=60) == ([], 0)  # already here


def test_a_missing_object_leaves_no_partial_file(s3_bucket, tmp_path):
    uri = storage.join(s3_bucket, "ckpt")
    with pytest.raises(FileNotFoundError):
        storage.fetch_files(uri, ["deepspeed/nothing.pt"], str(tmp_path), timeout_s=60)
    assert not [f for f in os.listdir(tmp_path / "deepspeed") if not f.endswith(".lock")]


class _Engine:
    """Stands in for the DeepSpeed engine: records the files of the dir it is asked to load from."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def load_checkpoint(self, load_dir: str, tag: str, **_) -> tuple[str, dict]:
        self.seen = sorted(os.path.relpath(os.path.join(d, f), load_dir).replace(os.sep, "/")
                           for d, _, fs in os.walk(load_dir) for f in fs if not f.endswith(".lock"))
        return os.path.join(load_dir, tag), {}


def _rank(r: int, stage: int) -> LearnerCheckpoints:
    w = LearnerCheckpoints()
    w.rank, w.engine = r, _Engine()
    w.cfg = SimpleNamespace(zero_stage=stage, dtype="fp32", step_timeout_s=60.0, lora=None)
    return w


def test_load_checkpoint_gives_deepspeed_only_this_ranks_files_and_removes_them(s3_bucket, monkeypatch, tmp_path,
                                                                                 caplog):
    monkeypatch.setenv("RELAYRL_CACHE", str(tmp_path / "cache"))
    uri = storage.join(s3_bucket, "run", "checkpoints", "step_000003", "learner")
    _upload_checkpoint(uri, _present(3, False))
    caplog.set_level(logging.INFO, logger="learner.checkpointing")
    for r in (0, 1):
        w = _rank(r, 3)
        assert w.load_checkpoint(uri)
        assert w.engine.seen == [f"{D}zero_pp_rank_{r}_mp_rank_00_model_states.pt",
                                 f"{D}zero_pp_rank_{r}_mp_rank_00_optim_states.pt", f"rng_rank{r}.pt"]
        assert f"learner rank {r} fetched 3 of 3 checkpoint files" in caplog.text
    assert not os.path.exists(shared_download_dir(uri))  # nothing of the checkpoint is left on the node


def test_load_checkpoint_fetches_everything_with_a_warning_when_names_differ(s3_bucket, monkeypatch, tmp_path,
                                                                              caplog):
    monkeypatch.setenv("RELAYRL_CACHE", str(tmp_path / "cache"))
    uri = storage.join(s3_bucket, "old", "learner")
    # DeepSpeed's older optimizer file name (no "_" before optim_states), which it still loads
    names = [n.replace("_optim_states", "optim_states") for n in _present(2, False)]
    _upload_checkpoint(uri, names)
    w = _rank(1, 2)
    assert w.load_checkpoint(uri)
    assert w.engine.seen == sorted(names)
    assert "learner rank 1: checkpoint" in caplog.text and "fetching all 7 files of it" in caplog.text


def test_load_checkpoint_without_this_ranks_rng_names_the_rank(s3_bucket):
    uri = storage.join(s3_bucket, "one", "learner")
    _upload_checkpoint(uri, [n for n in _present(2, False) if n != "rng_rank1.pt"])
    with pytest.raises(FileNotFoundError, match="has no RNG state for learner rank 1"):
        _rank(1, 2).load_checkpoint(uri)
