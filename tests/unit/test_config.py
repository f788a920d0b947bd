from pathlib import Path

import pytest

from pydantic import ValidationError

from orchestrator.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[2]


EXPERIMENTS = ROOT / "deploy" / "experiments"


@pytest.mark.parametrize("path", sorted(p for p in (ROOT / "deploy").rglob("*.toml") if EXPERIMENTS not in p.parents),
                         ids=lambda p: p.name)
def test_every_deploy_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig) and cfg.samples_per_step > 0


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.toml")), ids=lambda p: p.name)
def test_every_experiment_variant_config_loads(path):
    from tooling.experiment import load_spec

    spec = load_spec(path)
    for v in spec.variants:  # each variant is a valid run config before hours are spent on it
        cfg = load_config(ROOT / spec.config, [*spec.overrides, *v.overrides])
        assert isinstance(cfg, RunConfig), v.name


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["learner.lr=1e-6", "rollout.dtype=float32", "model.path=/x/y", "num_steps=3"])
    assert cfg.learner.lr == 1e-6 and cfg.rollout.dtype == "float32"
    assert cfg.model.path == "/x/y" and cfg.num_steps == 3


@pytest.mark.parametrize("override,field", [
    ("learner.lr=abc", "learner.lr"),
    ("learner.zero_stage=5", "learner.zero_stage"),
    ("rollout.group_size=1", "rollout.group_size"),
    ("learner.no_such_field=1", "learner.no_such_field"),
])
def test_validation_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_batch_divisibility_is_checked():
    with pytest.raises(ConfigError, match="divisible"):
        load_config(None, ["prompts_per_step=3", "rollout.group_size=3", "learner.micro_batch_size=2"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num_steps = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["num_steps"])


def test_configs_are_frozen():
    cfg = load_config(None)
    with pytest.raises(Exception):
        cfg.learner.lr = 1.0


def test_unsatisfiable_resources_fail_fast_naming_the_resource():
    from orchestrator.placement import check_resources

    cfg = load_config(None, ["learner.num_learners=2", "learner.num_cpus=1", "rollout.num_cpus=1"])
    with pytest.raises(RuntimeError, match=r"needs 3 CPU .* has 2"):
        check_resources(cfg, {"CPU": 2.0})
    with pytest.raises(RuntimeError, match=r"needs 1 GPU"):
        check_resources(load_config(None, ["learner.num_gpus=1"]), {"CPU": 8.0})
    check_resources(cfg, {"CPU": 3.0})  # exactly enough
    custom = load_config(None, ["learner.resources={trainer_slot = 1}", "rollout.resources={vllm_slot = 0.5}",
                                "rollout.num_workers=3"])
    with pytest.raises(RuntimeError, match=r"needs 1.5 vllm_slot \(learner: 1 x 0, rollout: 3 x 0.5\)"):
        check_resources(custom, {"CPU": 8.0, "trainer_slot": 1.0})
    check_resources(custom, {"CPU": 8.0, "trainer_slot": 1.0, "vllm_slot": 2.0})


def test_stale_data_without_correction_is_refused_with_a_reason():
    with pytest.raises(ConfigError, match="no off-policy correction"):
        load_config(None, ["buffer.max_staleness=2", "learner.loss=ppo"])
    assert load_config(None, ["buffer.max_staleness=0", "learner.loss=ppo"]).learner.loss.type == "ppo"
    cfg = load_config(None, ["buffer.max_staleness=2", "learner.loss=ppo", "allow_uncorrected_off_policy=true"])
    assert cfg.buffer.max_staleness == 2


def test_presets_fill_fields_and_explicit_values_win():
    cfg = load_config(None, ["preset=async_topr"])
    assert (cfg.learner.loss.type, cfg.learner.advantage.type, cfg.buffer.max_staleness) == ("topr", "rloo", 4)
    cfg = load_config(None, ["preset=async_topr", "buffer.max_staleness=1"])
    assert cfg.buffer.max_staleness == 1 and cfg.learner.loss.type == "topr"
    with pytest.raises(ConfigError, match="unknown preset"):
        load_config(None, ["preset=fastest"])


def test_every_registered_variant_is_selectable():
    from learner.advantages import ADVANTAGE_ESTIMATORS
    from learner.losses import POLICY_LOSSES
    from learner.config import LearnerConfig

    def tags(field: str) -> set[str]:  # the type tags of the union's classes
        return {c.model_fields["type"].default for c in LearnerConfig.model_fields[field].annotation.__args__}

    assert tags("loss") == set(POLICY_LOSSES)
    assert tags("advantage") == set(ADVANTAGE_ESTIMATORS)


def test_knapsack_allocation_bounds_are_checked():
    from orchestrator.config import ConfigError

    with pytest.raises((ConfigError, ValueError), match="allocation_min_n <= rollout.group_size"):
        load_config(None, ["buffer.rollout_allocation=knapsack", "rollout.group_size=8", "buffer.allocation_max_n=4"])
    with pytest.raises((ConfigError, ValueError), match="single-sample groups"):
        load_config(None, ["buffer.rollout_allocation=knapsack", "buffer.allocation_min_n=1"])
    cfg = load_config(None, ["buffer.rollout_allocation=knapsack", "buffer.allocation_min_n=1", "learner.advantage=spo",
                             "buffer.value_tracker=true"])
    assert cfg.buffer.allocation_min_n == 1


def test_gspo_gets_its_sequence_level_clip_range_and_refuses_a_token_level_one():
    cfg = load_config(None, ["learner.loss=gspo"])
    assert (cfg.learner.loss.clip_low, cfg.learner.loss.clip_high) == (3e-4, 4e-4)
    default = load_config(None, []).learner.loss
    assert (default.clip_low, default.clip_high) == (0.2, 0.28)
    assert load_config(None, ["learner.loss=gspo", "learner.loss.clip_high=1e-3"]).learner.loss.clip_high == 1e-3
    with pytest.raises(ConfigError, match=r"learner.loss = 'gspo'.*0.2 / 0.28"):
        load_config(None, ["learner.loss=gspo", "learner.loss.clip_low=0.2", "learner.loss.clip_high=0.28"])


def test_top_p_below_one_is_refused_with_the_reason():
    assert load_config(None, ["rollout.top_p=1.0"]).rollout.top_p == 1.0
    with pytest.raises(ConfigError, match=r"rollout.top_p = 0.9 .*importance weights.*set rollout.top_p = 1.0"):
        load_config(None, ["rollout.top_p=0.9"])


def test_a_token_budget_below_one_response_is_refused_by_name():
    with pytest.raises(ValidationError, match=r"learner.max_tokens_per_microbatch = 64 .*rollout.max_tokens = 64"):
        RunConfig.model_validate({"learner": {"max_tokens_per_microbatch": 64}, "rollout": {"max_tokens": 64}})
    assert RunConfig.model_validate({"learner": {"max_tokens_per_microbatch": 2048}}).learner.max_tokens_per_microbatch
