"""The TRL GRPOTrainer baseline runs a relayrl config on the tiny model and writes a run dir the
experiment tables read (real TRL, real vLLM for the held-out evals)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.tools.experiment import column_value, read_run

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("budget, steps", [(0, 2), (0.001, 1)])
def test_trl_baseline_trains_evaluates_and_stops_at_budget(tiny_sums_model, tmp_path, budget, steps):
    pytest.importorskip("trl")
    from orchestrator.cli import main

    args = [str(ROOT / "deploy/examples/tiny_cpu.toml"), f"model.path={tiny_sums_model}", f"output_dir={tmp_path}",
            "num_steps=2", "eval_every=1", f"time_budget_s={budget}", "data.eval_size=8", "data.one_shot=false",
            "rollout.max_tokens=8", "rollout.dtype=float32", "rollout.kv_cache_memory_bytes=67108864",
            "rollout.max_model_len=256", "learner.dtype=fp32", "learner.lr=1e-3"]
    assert main(["trl-baseline", *args]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    recs, summary = read_run(run_dir)
    assert [r["step"] for r in recs] == list(range(steps + 1))
    assert summary["step"] == steps and summary["trainer"].startswith("trl ")
    # held-out accuracy before training and after every step, measured by the vLLM evaluator
    assert all(0.0 <= r["eval/accuracy"] <= 1.0 for r in recs)
    secs = [r["perf/train_seconds"] for r in recs[1:]]
    assert all(s > 0 for s in secs) and secs == sorted(secs)
    assert all(0.0 <= r["rollout/reward_mean"] <= 1.0 for r in recs[1:])
    assert not list((run_dir / "policies").iterdir())  # evaluated policy files are deleted
    assert column_value("reach:eval/accuracy>=0", recs, summary) == "0 s @ step 0"
    assert json.loads((run_dir / "summary.json").read_text())["perf/train_seconds"] == secs[-1]
