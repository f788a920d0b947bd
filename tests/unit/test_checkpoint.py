"""Checkpoint layout: atomic commit, retention, interrupted writes ignored, resume compatibility; each on a
local dir and on a real S3-compatible server (moto on loopback, `s3_bucket`)."""

from __future__ import annotations

import pytest

from base import storage
from orchestrator.checkpoint import (COMPLETE, begin, commit, complete_checkpoints, find_run_to_resume,
                                     incompatible_fields, latest_checkpoint)
from orchestrator.cli import main
from orchestrator.config import load_config


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> str:
    """Where runs go: a local dir, or a prefix in a fresh bucket of the test S3 server."""
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket") + "/runs"


def _write(run: str, step: int, keep: int = 2) -> str:
    tmp = begin(run, step)
    storage.write_bytes(storage.join(tmp, "trainer.json"), b"{}")
    return commit(tmp, step, keep, {"step": step})


def test_commit_is_atomic_and_keeps_the_newest(where):
    run = storage.join(where, "r-1")
    for step in (1, 2, 3):
        _write(run, step)
    assert [storage.basename(p) for p in complete_checkpoints(run)] == ["step_000002", "step_000003"]
    assert storage.children(storage.join(run, "checkpoints")) == ["step_000002", "step_000003"]  # step 1 deleted
    # interrupted writes: a begun checkpoint with its files but no marker (on S3 under its own prefix),
    # and a step dir without the marker; both are ignored
    tmp = begin(run, 4)
    storage.write_bytes(storage.join(tmp, "learner", "rng_rank0.pt"), b"x")
    storage.write_bytes(storage.join(tmp, "trainer.json"), b"{}")
    storage.write_bytes(storage.join(run, "checkpoints", "step_000005", "trainer.json"), b"{}")
    assert storage.basename(latest_checkpoint(run)) == "step_000003"
    assert find_run_to_resume(where, "r") == run
    # the marker is the last thing written: once it exists, the checkpoint counts
    done = _write(run, 4)
    assert storage.basename(done) == "step_000004" and latest_checkpoint(run) == done
    assert storage.exists(storage.join(done, COMPLETE))
    assert not storage.exists(storage.join(done, "learner", "rng_rank0.pt"))  # the stale attempt was removed
    with pytest.raises(FileExistsError):
        _write(run, 4)


def test_find_run_to_resume_picks_newest_with_checkpoint(where):
    storage.write_bytes(storage.join(where, "job-a", "config.json"), b"{}")  # no checkpoint
    _write(storage.join(where, "job-c"), 1)
    _write(storage.join(where, "job-b"), 1)  # committed last
    _write(storage.join(where, "other-d"), 2)
    assert find_run_to_resume(where, "job") == storage.join(where, "job-b")
    assert find_run_to_resume(where, "none") is None
    assert find_run_to_resume(storage.join(where, "missing"), "job") is None


def test_incompatible_fields_are_named():
    a = load_config(None, []).model_dump(mode="json")
    b = load_config(None, ["rollout.group_size=4", "prompts_per_step=16", "learner.lr=1e-3", "num_steps=99"])
    bad = incompatible_fields(a, b.model_dump(mode="json"))
    assert bad == ["prompts_per_step: 8 -> 16", "rollout.group_size: 8 -> 4"]  # lr and num_steps may change


def test_resume_of_a_dir_without_checkpoint_is_a_clear_error(where, tmp_path, capsys):
    run = storage.join(where, "run")
    storage.write_bytes(storage.join(run, "config.json"), b"{}")
    storage.write_bytes(storage.join(run, "checkpoints", "step_000001", "trainer.json"), b"{}")  # no marker
    cfg = tmp_path / "c.toml"
    cfg.write_text('num_steps = 1\n[data]\ntrain_size = 8\neval_size = 0\n')
    rc = main(["train", str(cfg), "--resume", run, "model.path=/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2 and "no complete checkpoint" in err and run in err
