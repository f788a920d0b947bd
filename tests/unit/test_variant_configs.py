"""``learner.loss`` and ``learner.advantage`` are tagged unions: a name, a table with ``type`` and knobs, dotted
overrides into it, and a one-line error for a knob where it used to be (`learner.config`)."""

from __future__ import annotations

import pytest

from learner.advantages import ADVANTAGE_ESTIMATORS, RlooAdvantageConfig, SpoAdvantageConfig
from learner.config import LearnerConfig
from learner.losses import POLICY_LOSSES, GspoLossConfig, IcepopLossConfig, PpoTisLossConfig
from orchestrator.config import ConfigError, RunConfig, load_config


def _toml(tmp_path, text: str):
    p = tmp_path / "run.toml"
    p.write_text(text)
    return p


def test_a_name_is_that_variant_with_its_defaults(tmp_path):
    cfg = load_config(_toml(tmp_path, '[learner]\nloss = "icepop"\nadvantage = "rloo"\n'))
    assert cfg.learner.loss == IcepopLossConfig() and cfg.learner.advantage == RlooAdvantageConfig()
    assert LearnerConfig().loss == PpoTisLossConfig() and LearnerConfig().advantage.type == "grpo"
    for name in POLICY_LOSSES:
        cfg = load_config(None, [f"learner.loss={name}", "allow_uncorrected_off_policy=true"])
        assert cfg.learner.loss == POLICY_LOSSES[name].config()
    for name in ADVANTAGE_ESTIMATORS:
        extra = ["buffer.value_tracker=true"] if name == "spo" else []
        assert load_config(None, [f"learner.advantage={name}", *extra]).learner.advantage.type == name


def test_a_table_sets_the_knobs(tmp_path):
    cfg = load_config(_toml(tmp_path, '[learner]\nloss = {type = "icepop", band_high = 3.0}\n'))
    assert cfg.learner.loss == IcepopLossConfig(band_high=3.0)
    cfg = load_config(_toml(tmp_path, '[buffer]\nvalue_tracker = true\n[learner.loss]\ntype = "gspo"\n'
                                      'clip_high = 5e-4\n[learner.advantage]\ntype = "spo"\neps = 1e-4\n'))
    assert cfg.learner.loss == GspoLossConfig(clip_high=5e-4) and cfg.learner.advantage == SpoAdvantageConfig(eps=1e-4)


def test_dotted_overrides_reach_a_knob(tmp_path):
    assert load_config(None, ["learner.loss.clip_high=0.3"]).learner.loss == PpoTisLossConfig(clip_high=0.3)
    named = _toml(tmp_path, '[learner]\nloss = "gspo"\n')  # a name in the file, a knob on the command line
    assert load_config(named, ["learner.loss.clip_high=5e-4"]).learner.loss == GspoLossConfig(clip_high=5e-4)
    cfg = load_config(None, ["learner.loss=icepop", "learner.loss.band_low=0.8"])
    assert cfg.learner.loss == IcepopLossConfig(band_low=0.8)
    assert load_config(None, ["learner.loss.type=topr"]).learner.loss.type == "topr"
    table = _toml(tmp_path, '[learner]\nloss = {type = "icepop", band_high = 3.0}\n')
    assert load_config(table, ["learner.loss=gspo"]).learner.loss == GspoLossConfig()  # another loss: its own knobs
    assert load_config(None, ["learner.advantage.eps=1e-3"]).learner.advantage.eps == 1e-3
    with pytest.raises(ConfigError, match=r"learner\.loss\.topr\.clip_low: Extra inputs"):
        load_config(None, ["learner.loss=topr", "learner.loss.clip_low=0.1"])


def test_presets_merge_with_a_knob_and_yield_to_another_loss():
    cfg = load_config(None, ["preset=async_decoupled_tis", "learner.loss.tis_cap=4.0"])
    assert cfg.learner.loss == PpoTisLossConfig(tis_cap=4.0) and cfg.buffer.max_staleness == 2
    assert load_config(None, ["preset=async_topr", "learner.loss=ppo_tis"]).learner.loss == PpoTisLossConfig()


@pytest.mark.parametrize("override, message", [
    ("learner.clip_low=0.1", 'learner.clip_low is a knob of learner.loss now: set learner.loss = {type = "ppo_tis", '
                             "clip_low = ...} (override: learner.loss.clip_low=...)"),
    ("learner.band_high=3.0", 'set learner.loss = {type = "icepop", band_high = ...}'),
    ("learner.eps=1e-3", 'learner.eps is a knob of learner.advantage now: set learner.advantage = {type = "grpo"'),
])
def test_a_knob_at_the_top_level_says_where_it_went(override, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("(", r"\(").replace(")", r"\)")
                       .replace(".", r"\.").replace("+", r"\+")):
        load_config(None, [override])
    with pytest.raises(ConfigError, match='type = "gspo", tis_cap'):  # the chosen loss, when it has the knob
        load_config(None, ["learner.loss=gspo", "learner.tis_cap=3.0"])


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(ConfigError, match=r"learner.loss = 'foo' is not registered; use one of \['bapo', 'clip_cov', 'gspo'"):
        load_config(None, ["learner.loss=foo"])
    with pytest.raises(ConfigError, match="does not match any of the expected tags: 'ppo_tis'"):
        load_config(None, ['learner.loss={type = "foo"}'])


def test_the_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["learner.loss=icepop", "learner.loss.band_low=0.7", "learner.advantage=reinforce_pp"])
    assert RunConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # what a resumed run reads back
