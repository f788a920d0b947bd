"""Weights & Biases sink: offline mode writes the run's metrics locally, under the run dir."""

from __future__ import annotations

import time

import pytest

from orchestrator.config import MetricsConfig
from orchestrator.metrics import MetricsLogger


def test_wandb_offline_run_gets_every_metric(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is part of the test install; skipped elsewhere")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run-1"
    log = MetricsLogger(run_dir, wandb_cfg=MetricsConfig(wandb_project="relayrl-test", wandb_mode="offline"),
                        run_config={"seed": 3})
    log.log(1, {"rollout/reward_mean": 0.25, "learner/loss": float("nan")})
    log.log(2, {"rollout/reward_mean": 0.5})
    log.log(3, {"rollout/reward_mean": 0.75})
    summary = dict(log._wandb.summary)  # W&B commits a step when the next one (or the end of the run) comes
    log.close()
    assert summary["rollout/reward_mean"] == 0.5 and summary["_step"] == 2
    assert "learner/loss" not in summary  # non-finite values are left out, as in the JSONL (null there)
    files = list((run_dir / "wandb").glob("offline-run-*-run-1/run-run-1.wandb"))  # W&B run id = run dir name
    assert len(files) == 1
    # W&B's service process may still be writing the records when finish() returns (seen on a loaded
    # 2-core machine: only the file header yet); wait for them, bounded
    deadline = time.monotonic() + 60
    while b"rollout/reward_mean" not in files[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"rollout/reward_mean" in files[0].read_bytes()
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 3


def test_wandb_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(RuntimeError, match=r"metrics.wandb_project = 'p' needs the wandb package.*relayrl\[wandb\]"):
        MetricsLogger(tmp_path / "r", wandb_cfg=MetricsConfig(wandb_project="p"))
