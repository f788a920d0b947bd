"""The TRL GRPOTrainer baseline (`relayrl trl-baseline`) runs a relayrl config on the tiny sums model
and writes a run dir the experiment tables read (real TRL, real vLLM for the held-out evals)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import load_config
from tooling.experiment import column_value, read_run
from rollout.tasks import load_problems

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
EVAL_SIZE = 8


@pytest.mark.timeout(600)
@pytest.mark.parametrize("budget, steps", [(0, 2), (0.001, 1)])
def test_trl_baseline_trains_evaluates_and_stops_at_budget(tiny_sums_model, tmp_path, budget, steps):
    pytest.importorskip("trl")
    from tiny_model import hf_greedy_accuracy

    from orchestrator.cli import main

    # 16 tokens fit the sums model's whole answer ("4 + 5 = 9.\nAnswer: 9" is 11), so rewards are mixed
    config = str(ROOT / "deploy/examples/tiny_cpu.toml")
    overrides = [f"model.path={tiny_sums_model}", f"output_dir={tmp_path}", "num_steps=2", "eval_every=1",
                 f"time_budget_s={budget}", f"data.eval_size={EVAL_SIZE}", "data.one_shot=false",
                 "rollout.max_tokens=16", "rollout.dtype=float32", "rollout.kv_cache_memory_bytes=67108864",
                 "rollout.max_model_len=256", "learner.dtype=fp32", "learner.lr=1e-3"]
    assert main(["trl-baseline", config, *overrides]) == 0
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    recs, summary = read_run(run_dir)
    assert [r["step"] for r in recs] == list(range(steps + 1))
    assert summary["step"] == steps and summary["trainer"].startswith("trl ")
    # held-out accuracy before training and after every step, measured by the vLLM evaluator: a count of
    # correct greedy answers over the 8 problems, and at step 0 (the base model) the count transformers'
    # own greedy decoding gets
    assert all((r["eval/accuracy"] * EVAL_SIZE).is_integer() for r in recs)
    cfg = load_config(config, overrides)
    problems = load_problems(cfg.data, "eval")
    assert len(problems) == EVAL_SIZE
    base = hf_greedy_accuracy(tiny_sums_model, problems, cfg.data.instruction, False, cfg.rollout.max_tokens)
    assert 0 < base < 1 and recs[0]["eval/accuracy"] == base
    secs = [r["perf/train_seconds"] for r in recs[1:]]
    assert all(s > 0 for s in secs) and secs == sorted(secs)
    assert 0.0 < recs[1]["rollout/reward_mean"] < 1.0  # mixed rewards: a learning signal
    assert not list((run_dir / "policies").iterdir())  # evaluated policy files are deleted
    # the time-to-accuracy column reads the baseline's run dir: the base accuracy is met at step 0 with
    # no training time; a higher accuracy than any step reached is reported with the last step's clock
    assert column_value(f"reach:eval/accuracy>={base}", recs, summary) == "0 s @ step 0"
    unreached = max(r["eval/accuracy"] for r in recs) + 0.01
    assert column_value(f"reach:eval/accuracy>={unreached}", recs, summary) == \
        f"not reached ({secs[-1]:.0f} s, {steps} steps)"
    assert json.loads((run_dir / "summary.json").read_text())["perf/train_seconds"] == secs[-1]
