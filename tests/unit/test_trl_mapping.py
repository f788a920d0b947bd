"""The TRL baseline's config mapping (hand-checked values) and the experiment's time-to-accuracy column."""

from __future__ import annotations

import pytest

from orchestrator.config import RunConfig
from tooling.experiment import column_value
from tooling.trl_baseline import grpo_config_kwargs


def _cfg(**kw) -> RunConfig:
    base = {"model": {"path": "m"}, "prompts_per_step": 8, "num_steps": 15, "seed": 3,
            "rollout": {"group_size": 8, "max_tokens": 48, "temperature": 0.9},
            "learner": {"lr": 2e-5, "micro_batch_size": 8, "grad_clip": 1.0,
                        "loss": {"type": "ppo_tis", "clip_low": 0.2, "clip_high": 0.28}}}
    for k, v in kw.items():
        section, _, field = k.partition("__")
        if field:
            base.setdefault(section, {})[field] = v
        else:
            base[k] = v
    return RunConfig.model_validate(base)


def test_mapping_matches_the_run_config():
    kw = grpo_config_kwargs(_cfg(), "out", use_cpu=True)
    # 8 prompts x 8 samples = 64 completions per optimizer step, 8 per forward/backward
    assert kw["per_device_train_batch_size"] == 8 and kw["gradient_accumulation_steps"] == 8
    assert kw["num_generations"] == 8 and kw["max_completion_length"] == 48 and kw["temperature"] == 0.9
    assert kw["learning_rate"] == 2e-5 and kw["lr_scheduler_type"] == "constant" and kw["max_grad_norm"] == 1.0
    assert (kw["epsilon"], kw["epsilon_high"], kw["beta"]) == (0.2, 0.28, 0.0)
    assert kw["loss_type"] == "dapo" and kw["scale_rewards"] == "group" and kw["num_iterations"] == 1
    assert kw["max_steps"] == 15 and kw["seed"] == 3 and kw["bf16"] and not kw["gradient_checkpointing"]


def test_mapping_of_drgrpo_constant_normaliser_and_warmup():
    kw = grpo_config_kwargs(_cfg(learner__advantage="drgrpo", learner__loss_agg="constant", learner__warmup_steps=2,
                                 learner__dtype="fp32"), "out", use_cpu=True)
    assert kw["scale_rewards"] == "none" and kw["loss_type"] == "dr_grpo"
    assert kw["lr_scheduler_type"] == "constant_with_warmup" and kw["warmup_steps"] == 2 and not kw["bf16"]


@pytest.mark.parametrize("kw, named", [
    ({"learner__advantage": "rloo"}, "'rloo'"),
    ({"learner__loss": "topr"}, "'topr'"),
    ({"learner__ppo_minibatches": 2}, "ppo_minibatches = 2"),
])
def test_unmappable_settings_are_refused_by_name(kw, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        grpo_config_kwargs(_cfg(**kw), "out", use_cpu=True)


def test_trl_accepts_the_mapping(tmp_path):
    trl = pytest.importorskip("trl")
    args = trl.GRPOConfig(**grpo_config_kwargs(_cfg(), str(tmp_path), use_cpu=True))
    assert args.generation_batch_size == 64  # one generation round per optimizer step: on-policy
    assert args.steps_per_generation == 8


RECS = [{"step": 0, "eval/accuracy": 0.455},
        {"step": 1, "perf/train_seconds": 60.0},
        {"step": 2, "perf/train_seconds": 125.4, "eval/accuracy": 0.49},
        {"step": 3, "perf/train_seconds": 190.0},
        {"step": 4, "perf/train_seconds": 251.6, "eval/accuracy": 0.5}]


def test_reach_column_reports_training_seconds_at_first_crossing():
    assert column_value("reach:eval/accuracy>=0.5", RECS, {}) == "252 s @ step 4"
    assert column_value("reach:eval/accuracy>=0.4", RECS, {}) == "0 s @ step 0"
    assert column_value("reach:eval/accuracy>=0.6", RECS, {}) == "not reached (252 s, 4 steps)"


@pytest.mark.parametrize("spec", ["reach:eval/accuracy", "reach:eval/accuracy>=high", "reach:>=0.5"])
def test_reach_column_with_a_malformed_spec_names_it(spec):
    with pytest.raises(ValueError, match="reach:<key>>=<number>"):
        column_value(spec, RECS, {})
