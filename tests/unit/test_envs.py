"""The environment registry, its config checks, and the built-in environments' turns (real sandbox)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from buffer import Problem
from rollout.config import RolloutConfig
from rollout.envs import ENVIRONMENTS, EnvConfig, make_environment

PROBLEM = Problem("train/0", "What is 123 * 45?", "5535")


def test_the_registry_is_the_one_list_of_environment_types():
    make_environment(EnvConfig(), PROBLEM)  # loads the built-ins
    assert {"single_turn", "tool_math", "textarena", "openenv"} <= set(ENVIRONMENTS)
    for name in ENVIRONMENTS:  # every registered name is a valid rollout.env.type, and nothing else is
        EnvConfig(type=name, max_turns=2 if name != "single_turn" else 1)
    with pytest.raises(ValidationError, match="'chess' has no registered environment .*single_turn.*import path"):
        EnvConfig(type="chess")


def test_bad_settings_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="unknown key\\(s\\) \\['tool'\\]"):
        make_environment(EnvConfig(type="tool_math", options={"tool": ["python"]}), PROBLEM)
    with pytest.raises(ValueError, match="choose from"):
        make_environment(EnvConfig(type="tool_math", options={"tools": ["shell"]}), PROBLEM)
    with pytest.raises(ValidationError, match="max_turns = 3 with rollout.env.type = 'single_turn'"):
        EnvConfig(max_turns=3)
    with pytest.raises(ValidationError, match="leaves no room for the prompt"):
        RolloutConfig(max_model_len=512, env=EnvConfig(type="tool_math", max_turns=2, max_episode_tokens=512))


def test_tool_math_turns():
    env = make_environment(EnvConfig(type="tool_math", max_turns=3, options={"max_calls_per_turn": 1}), PROBLEM)
    opening = env.reset(0)
    assert [m["role"] for m in opening] == ["system", "user"] and "<tool_call>" in opening[0]["content"]
    call = '<tool_call>{"name": "calculator", "arguments": {"expression": "123 * 45"}}</tool_call>'
    r = env.step("Let me check. " + call + call)
    assert not r.done and r.reward == 0.0 and r.info == {"tool_calls": 1, "tool_failures": 0}
    assert "<tool_response>\n5535\n</tool_response>" in r.observation[0]["content"] and "refused" in r.observation[0][
        "content"]
    bad = env.step('<tool_call>{"name": "python", "arguments": {"code": "1/0"}}</tool_call>')
    assert bad.info["tool_failures"] == 1 and "ZeroDivisionError" in bad.observation[0]["content"]
    end = env.step("123 * 45 = 5535.\nAnswer: 5535")
    assert end.done and end.reward == 1.0 and end.info["correct"]


def test_single_turn_is_one_step():
    env = make_environment(EnvConfig(), PROBLEM)
    assert env.reset(0)[-1]["content"].startswith("What is 123 * 45?")
    r = env.step("Answer: 5535")
    assert r.done and r.reward == 1.0 and r.observation == [] and "reward_error" not in r.info


@pytest.mark.parametrize("env_type", ["single_turn", "tool_math"])
def test_answers_are_scored_by_the_runs_scorer_and_its_failure_is_reported(env_type):
    calls = []

    def scorer(text, reference):
        calls.append((text, reference))
        return (0.5, False, "") if len(calls) == 1 else (0.0, False, "raised ValueError: unparsable")

    cfg = EnvConfig(type=env_type)
    r = make_environment(cfg, PROBLEM, scorer).step("Answer: 5535")
    assert calls == [("Answer: 5535", "5535")] and r.done and r.reward == 0.5 and "reward_error" not in r.info
    r = make_environment(cfg, PROBLEM, scorer).step("Answer: 5535")
    assert r.done and r.info["reward_error"] == "raised ValueError: unparsable"
