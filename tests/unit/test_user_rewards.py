"""Reward functions from the user's own code (``[[rollout.rewards]]``): real modules written to a tmp dir and
imported by path, TRL's reward-function signature (TRL's own `trl.rewards` functions used unchanged), async
functions, None (not applicable), weights and totals, failures that fail a sample and never the caller, and
the one-line errors of a bad import path or signature."""

from __future__ import annotations

import itertools
import sys
import textwrap
import time

import pytest
from pydantic import ValidationError

from rollout.config import DataConfig, RewardConfig, RolloutConfig
from rollout.rewards import RewardSet, Score, hung_reward_calls, reward_columns, score_response

USER_REWARDS = '''
import asyncio
import threading

RELEASE = threading.Event()  # the test sets it at the end: the hung call's thread then returns
CALLS = []

def length_reward(completions, **kwargs):
    """TRL's documented shape: a list of floats, one per completion."""
    return [min(len(c), 20) / 20 for c in completions]

def answer_line(prompts, completions, answer, **kwargs):
    """1.0 with an Answer: line, None (not applicable) when the reference is not a number."""
    CALLS.append((list(prompts), list(completions), list(answer), sorted(kwargs)))
    return [None if not a.isdigit() else float("Answer:" in c) for c, a in zip(completions, answer)]

async def async_contains(prompts, completions, answer, **kwargs):
    await asyncio.sleep(0.01)
    return [float(a in c) for c, a in zip(completions, answer)]

def solution_reward(completions, solution, **kwargs):
    return [float(s in c) for c, s in zip(completions, solution)]

def raises(completions, **kwargs):
    raise RuntimeError("judge unreachable")

def hangs(completions, **kwargs):
    RELEASE.wait(60)
    return [1.0]

async def async_hangs(completions, **kwargs):
    await asyncio.sleep(60)

def two_values(completions, **kwargs):
    return [1.0, 0.0]

def not_a_list(completions, **kwargs):
    return 1.0

def nan(completions, **kwargs):
    return [float("nan")]

def no_kwargs(prompts, completions):
    return [1.0]

def positional_only(prompts, completions, /, **kwargs):
    return [1.0]

NOT_A_FUNCTION = 3

class Judge:
    def __call__(self, prompts, completions, **kwargs):
        return [0.5 for _ in completions]

judge = Judge()
'''

_ids = itertools.count()


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A fresh module (a new name per test, so no test sees another's import) written to ``tmp_path`` and
    importable from there, as a user's ``rewards.py``; yields its name."""
    name = f"user_rewards_{next(_ids)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    module = sys.modules.pop(name, None)
    if module is not None:
        module.RELEASE.set()


def _rewards(mod: str, *entries: tuple[str, float], timeout_s: float = 5.0,
             columns: tuple[str, ...] = ("answer",)) -> RewardSet:
    """A `RewardSet` of ``(function name in mod, or "exact_match", weight)`` entries."""
    cfgs = [RewardConfig(fn=fn if fn == "exact_match" else f"{mod}:{fn}", weight=w) for fn, w in entries]
    return RewardSet(cfgs, timeout_s, columns)


def test_default_config_is_the_strict_exact_match_alone():
    cfg = RolloutConfig()
    assert [(r.fn, r.name, r.weight) for r in cfg.rewards] == [("exact_match", "exact_match", 1.0)]
    rs = RewardSet(cfg.rewards, cfg.reward_timeout_s)
    for text, ref in [("2+2=4\nAnswer: 4", "4"), ("4", "4"), ("Answer: 5", "4"), ("Answer: \\frac{1}{2}", "0.5")]:
        s = rs.score("q", text, ref)
        assert s == (*score_response(text, ref), "")  # exactly today's (reward, correct, "")
        assert s.terms == {"exact_match": score_response(text, ref)[0]} and s.failed == ()


def test_weighted_total_is_the_sum_over_the_rewards_that_applied(user_module):
    rs = _rewards(user_module, ("exact_match", 2.0), ("length_reward", 0.5), ("answer_line", -1.0))
    s = rs.score("What is 2+2?", "2+2=4\nAnswer: 4", "4")
    length = min(len("2+2=4\nAnswer: 4"), 20) / 20
    assert s.terms == {"exact_match": 1.0, "length_reward": length, "answer_line": 1.0}
    assert s == (pytest.approx(2.0 * 1.0 + 0.5 * length - 1.0), True, "")
    # None (not applicable: a non-numeric reference) adds nothing, as TRL's nansum over reward functions
    s = rs.score("Name the colour", "Answer: red", "red")
    assert s.terms == {"exact_match": 1.0, "length_reward": 0.55, "answer_line": None}
    assert s == (pytest.approx(2.0 + 0.5 * 0.55), True, "")
    # correct stays the strict exact match whatever the rewards are: a long wrong answer scores but is not correct
    s = _rewards(user_module, ("length_reward", 1.0)).score("q", "Answer: 5 and a long text", "4")
    assert s == (1.0, False, "") and s.terms == {"length_reward": 1.0}


def test_trl_signature_keywords_and_columns(user_module):
    mod = sys.modules.get(user_module) or __import__(user_module)
    _rewards(user_module, ("answer_line", 1.0), columns=("answer", "solution")).score("What is 1+1?", "Answer: 2", "2")
    assert mod.CALLS == [(["What is 1+1?"], ["Answer: 2"], ["2"], ["solution"])]
    # a data file whose reference column is "solution" hands it under that name too (TRL passes every column)
    assert reward_columns(DataConfig(type="jsonl", path="x.jsonl", answer_field="solution")) == ("answer", "solution")
    assert reward_columns(DataConfig()) == ("answer",)
    s = _rewards(user_module, ("solution_reward", 1.0), columns=("answer", "solution")).score("q", "it is 7", "7")
    assert s == (1.0, False, "")
    with pytest.raises(ValueError, match=r"solution_reward'.*missing a required argument: 'solution'.*answer_field"):
        _rewards(user_module, ("solution_reward", 1.0))  # reasoning-gym data has no "solution" column


def test_trl_library_reward_functions_work_unchanged():
    """TRL's own reward functions (conversational format), called by relayrl as GRPOTrainer calls them."""
    from trl.rewards import accuracy_reward, think_format_reward

    rs = RewardSet([RewardConfig(fn="trl.rewards:think_format_reward", format="conversational"),
                    RewardConfig(fn="trl.rewards:accuracy_reward", format="conversational", weight=2.0)],
                   5.0, ("answer", "solution"))
    for text, ref in [("<think>\nadd them\n</think>\nThe sum is $\\boxed{\\frac{1}{3}}$", "$\\frac{1}{3}$"),
                      ("no tags, \\boxed{2}", "$3$")]:
        s = rs.score("q", text, ref)
        completions = [[{"role": "assistant", "content": text}]]
        expected = {"think_format_reward": think_format_reward(completions)[0],
                    "accuracy_reward": accuracy_reward(completions, [ref])[0]}
        assert s.terms == expected and s.reward == pytest.approx(expected["think_format_reward"]
                                                                + 2.0 * expected["accuracy_reward"])
    assert rs.score("q", "<think>x</think> \\boxed{1}", "$\\frac{1}{3}$").terms["accuracy_reward"] == 0.0
    assert rs.score("q", "<think>x</think> \\boxed{1}", "$\\frac{1}{3}$").terms["think_format_reward"] == 1.0


def test_async_functions_and_callable_objects(user_module):
    rs = _rewards(user_module, ("async_contains", 1.0), ("judge", 3.0))
    assert rs.score("q", "it is 42", "42") == (pytest.approx(1.0 + 1.5), False, "")
    assert rs.score("q", "it is 41", "42").terms == {"async_contains": 0.0, "judge": 0.5}


@pytest.mark.parametrize("fn,why", [
    ("raises", "reward 'raises' raised RuntimeError: judge unreachable"),
    ("two_values", "reward 'two_values' returned 2 values for 1 completion"),
    ("not_a_list", "reward 'not_a_list' returned float, not a list with one value per completion"),
    ("nan", "reward 'nan' returned a non-finite reward nan"),
])
def test_a_failing_function_fails_the_sample_not_the_caller(user_module, fn, why):
    s = _rewards(user_module, ("exact_match", 1.0), (fn, 1.0)).score("q", "Answer: 4", "4")
    assert s[:2] == (0.0, False) and s[2].startswith(why)
    assert s.failed == (fn,) and s.terms == {"exact_match": 1.0}  # the others' values are still reported


def test_a_hanging_function_times_out_and_the_next_samples_go_on(user_module):
    rs = _rewards(user_module, ("length_reward", 1.0), ("hangs", 1.0), timeout_s=0.3)
    before = hung_reward_calls()
    t0 = time.perf_counter()
    s = rs.score("q", "Answer: 4", "4")
    assert time.perf_counter() - t0 < 2.0
    assert s[:2] == (0.0, False) and s[2] == "reward 'hangs' timed out after 0.3 s" and s.failed == ("hangs",)
    assert hung_reward_calls() == before + 1  # its thread still runs (threads cannot be killed): counted
    ok = _rewards(user_module, ("length_reward", 1.0), timeout_s=0.3).score("q", "Answer: 4", "4")
    assert ok == (pytest.approx(0.45), True, "")
    # an async function stuck at an await is cancelled at the deadline: its thread comes back
    t0 = time.perf_counter()
    s = _rewards(user_module, ("async_hangs", 1.0), timeout_s=0.3).score("q", "x", "4")
    assert s[2] == "reward 'async_hangs' timed out after 0.3 s" and time.perf_counter() - t0 < 2.0


def test_the_budget_runs_from_when_a_thread_takes_the_call():
    """Calls queued behind busy reward threads are not timed out before they start: 32 samples whose check
    takes 0.5 s on 16 reward threads need two rounds, 1 s, more than the 0.8 s budget of each call."""
    from concurrent.futures import ThreadPoolExecutor

    from rollout.rewards import REWARD_THREADS

    slow = RewardSet([RewardConfig(fn="exact_match")], 0.8, check=lambda t, r: (time.sleep(0.5), (1.0, True))[1])
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2 * REWARD_THREADS) as pool:
        scores = list(pool.map(lambda i: slow.score("q", "Answer: 4", "4"), range(2 * REWARD_THREADS)))
    assert time.perf_counter() - t0 > 0.8
    assert [s[2] for s in scores if s[2]] == []


def test_config_errors_are_one_line_and_name_the_value_and_the_fix(user_module, tmp_path):
    (tmp_path / "broken_rewards.py").write_text("import nonexistent_dependency_xyz\n")

    def err(fn: str) -> str:
        with pytest.raises(ValidationError) as e:
            RolloutConfig(rewards=[{"fn": fn}])
        msg = e.value.errors()[0]["msg"]
        assert "\n" not in msg
        return msg

    assert "'no_such_reward' is neither a built-in reward (exact_match) nor an import path" in err("no_such_reward")
    assert "module 'no_such_pkg_xyz.rewards' cannot be imported" in err("no_such_pkg_xyz.rewards:f")
    assert "working dir" in err("no_such_pkg_xyz.rewards:f") and "py_modules" in err("no_such_pkg_xyz:f")
    assert ("importing 'broken_rewards' raised ModuleNotFoundError: No module named 'nonexistent_dependency_xyz' (a "
            "package it imports is not installed here)") in err("broken_rewards:f")
    assert f"'{user_module}' (" in err(f"{user_module}:nope") and "has no attribute 'x'" in err(f"{user_module}:x")
    assert "is a int, not a function" in err(f"{user_module}:NOT_A_FUNCTION")
    assert "is a type, not a function" in err(f"{user_module}:Judge")
    assert "has no **kwargs" in err(f"{user_module}:no_kwargs") and "add **kwargs" in err(f"{user_module}:no_kwargs")
    assert "parameters prompts, completions are positional-only" in err(f"{user_module}:positional_only")
    assert "is not an import path of the form 'pkg.module:name'" in err(":f")
    with pytest.raises(ValidationError, match="name\\(s\\) \\['exact_match'\\] given to more than one reward"):
        RolloutConfig(rewards=[{"fn": "exact_match"}, {"fn": "exact_match", "weight": 2}])
    with pytest.raises(ValidationError, match="at least 1 item"):
        RolloutConfig(rewards=[])
    ok = RolloutConfig(rewards=[{"fn": "exact_match", "name": "correct", "weight": 2},
                                {"fn": f"{user_module}:solution_reward"}])  # "solution": a column the data may hold
    assert [(r.name, r.weight) for r in ok.rewards] == [("correct", 2.0), ("solution_reward", 1.0)]


def test_rewards_through_the_run_config_and_dotted_overrides(user_module, tmp_path):
    from orchestrator.config import ConfigError, load_config

    toml = tmp_path / "run.toml"
    toml.write_text(textwrap.dedent(f"""
        [[rollout.rewards]]
        fn = "exact_match"

        [[rollout.rewards]]
        fn = "{user_module}:length_reward"
        name = "length"
        weight = 0.1
    """))
    cfg = load_config(toml)
    assert [(r.name, r.fn, r.weight) for r in cfg.rollout.rewards] == [
        ("exact_match", "exact_match", 1.0), ("length", f"{user_module}:length_reward", 0.1)]
    cfg = load_config(None, [f'rollout.rewards=[{{fn = "{user_module}:answer_line", weight = 2.0}}]'])
    assert [(r.name, r.weight) for r in cfg.rollout.rewards] == [("answer_line", 2.0)]
    with pytest.raises(ConfigError, match=r"rollout\.rewards\.0\.fn: .*'nope_xyz' is neither a built-in reward"):
        load_config(None, ['rollout.rewards=[{fn = "nope_xyz"}]'])


def test_a_score_is_the_scorer_tuple_and_pickles():
    import pickle

    s = Score(1.5, True, "", {"a": 1.0, "b": None}, ())
    reward, correct, error = s
    assert (reward, correct, error) == (1.5, True, "") and s == (1.5, True, "")
    back = pickle.loads(pickle.dumps(s))
    assert back == s and back.terms == {"a": 1.0, "b": None} and back.failed == ()
