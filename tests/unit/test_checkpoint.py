"""Checkpoint layout: atomic commit, retention, interrupted writes ignored, resume compatibility."""

from __future__ import annotations

import pytest

from orchestrator.checkpoint import (begin, commit, complete_checkpoints, find_run_to_resume, incompatible_fields,
                                     latest_checkpoint)
from orchestrator.cli import main
from orchestrator.config import load_config


def _write(run_dir, step, keep=2):
    tmp = begin(run_dir, step)
    (tmp / "trainer.json").write_text("{}")
    return commit(tmp, step, keep, {"step": step})


def test_commit_is_atomic_and_keeps_the_newest(tmp_path):
    run = tmp_path / "r-1"
    for step in (1, 2, 3):
        _write(run, step)
    assert [p.name for p in complete_checkpoints(run)] == ["step_000002", "step_000003"]
    # an interrupted write: a .tmp dir and a dir without the COMPLETE marker are both ignored
    begin(run, 4)
    (run / "checkpoints" / "step_000005").mkdir()
    assert latest_checkpoint(run).name == "step_000003"
    # the next write of the same step replaces the stale .tmp
    assert _write(run, 4).name == "step_000004"
    with pytest.raises(FileExistsError):
        _write(run, 4)


def test_find_run_to_resume_picks_newest_with_checkpoint(tmp_path):
    (tmp_path / "job-a").mkdir()  # no checkpoint
    _write(tmp_path / "job-b", 1)
    (tmp_path / "other-c").mkdir()
    assert find_run_to_resume(tmp_path, "job") == tmp_path / "job-b"
    assert find_run_to_resume(tmp_path, "none") is None
    assert find_run_to_resume(tmp_path / "missing", "job") is None


def test_incompatible_fields_are_named():
    a = load_config(None, []).model_dump(mode="json")
    b = load_config(None, ["rollout.group_size=4", "prompts_per_step=16", "learner.lr=1e-3", "num_steps=99"])
    bad = incompatible_fields(a, b.model_dump(mode="json"))
    assert bad == ["prompts_per_step: 8 -> 16", "rollout.group_size: 8 -> 4"]  # lr and num_steps may change


def test_resume_of_a_dir_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    cfg = tmp_path / "c.toml"
    cfg.write_text('num_steps = 1\n[data]\ntrain_size = 8\neval_size = 0\n')
    rc = main(["train", str(cfg), "--resume", str(tmp_path / "run"), "model.path=/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2 and "no complete checkpoint" in err and str(tmp_path / "run") in err
