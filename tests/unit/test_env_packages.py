"""Environments nobody here wrote, played to the end by scripted players: a textarena game
(GuessTheNumber, real package) and a reasoning-gym task (``products``) solved with the sandboxed calculator."""

from __future__ import annotations

import re

import pytest

from buffer import Problem
from rollout.config import DataConfig
from rollout.envs import EnvConfig, make_environment
from rollout.tasks import load_problems

GAME = EnvConfig(type="textarena", max_turns=10, options={"env_id": "GuessTheNumber-v0"})


def _binary_search(env) -> tuple[list[float], dict, list[str]]:
    """Play GuessTheNumber (1..20) by bisection; returns the turn rewards, the last info and the observations."""
    lo, hi, rewards, seen = 1, 20, [], [env.reset(5)[0]["content"]]
    for _ in range(10):
        guess = (lo + hi) // 2
        r = env.step(f"I guess [{guess}]")
        rewards.append(r.reward)
        if r.done:
            return rewards, r.info, seen
        seen.append(r.observation[0]["content"])
        lo, hi = (guess + 1, hi) if "higher" in seen[-1] else (lo, guess - 1)
    raise AssertionError(f"bisection did not finish: {seen}")


def test_textarena_game_won_by_bisection():
    env = make_environment(GAME, Problem("train/0", "", ""))
    rewards, info, seen = _binary_search(env)
    assert "Guess The Number" in seen[0] and "between 1 and 20" in seen[0]
    assert all("higher" in s or "lower" in s for s in seen[1:])  # only what is new: no re-sent history
    assert all("[Player]" not in s and "I guess" not in s for s in seen[1:])  # the action is not echoed back
    assert rewards[-1] == 1.0 and sum(rewards) == 1.0 and info["correct"] and "Congratulations" in info["reason"]


def test_textarena_same_seed_same_game_and_invalid_moves_end_it():
    def hints(seed: int) -> list[str]:  # the game's answers to the guesses 1, 2, ... until it is won
        g = make_environment(GAME.model_copy(update={"options": {"env_kwargs": {"max_turns": 20}}}),
                             Problem("train/0", "", ""))
        g.reset(seed)
        out = []
        for k in range(1, 21):
            r = g.step(f"[{k}]")
            out.append("won" if r.done else r.observation[0]["content"])
            if r.done:
                return out
        return out

    assert hints(11) == hints(11)  # one seed: one hidden number (a GRPO group plays one game)
    assert any(hints(s) != hints(11) for s in (12, 13, 14))
    bad = make_environment(GAME, Problem("train/0", "", ""))
    bad.reset(3)
    r1 = bad.step("no guess here")
    assert not r1.done and "invalid move" in r1.observation[0]["content"]
    r2 = bad.step("still none")
    assert r2.done and r2.reward == 0.0 and not r2.info["correct"] and "Invalid Move" in r2.info["reason"]


def test_textarena_bad_id_names_it_and_how_to_list():
    with pytest.raises(ValueError, match=r"env_id = 'GuessTheNumbr-v0' is not a textarena game; list them"):
        make_environment(EnvConfig(type="textarena", options={"env_id": "GuessTheNumbr-v0"}), Problem("p", "", ""))


def test_reasoning_gym_products_solved_with_the_calculator():
    data = DataConfig(type="reasoning_gym", task="products", train_size=6, eval_size=0)
    cfg = EnvConfig(type="tool_math", max_turns=3, options={"tools": ["calculator"], "max_calls_per_turn": 1})
    problems = [p for p in load_problems(data, "train") if len(p.answer) >= 6][:2]
    assert problems, "reasoning-gym gave no multi-digit products"
    for p in problems:
        a, b = re.search(r"(\d+) \* (\d+)", p.question).groups()
        with_tool = make_environment(cfg, p)
        with_tool.reset(0)
        obs = with_tool.step(f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{a} * {b}"}}}}'
                             "</tool_call>")
        value = re.search(r"<tool_response>\n(-?\d+)\n", obs.observation[0]["content"]).group(1)
        end = with_tool.step(f"Answer: {value}")
        assert (end.done, end.reward, end.info["correct"]) == (True, 1.0, True), (p, value)
        guess = make_environment(cfg, p)
        guess.reset(0)
        wrong = guess.step(f"Answer: {int(a) * (int(b) + 1)}")  # a near miss without the tool scores 0 (exact match)
        assert (wrong.done, wrong.reward, wrong.info["correct"]) == (True, 0.0, False)
