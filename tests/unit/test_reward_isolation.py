"""Reward functions run in processes of their own (``isolate = true``, `rollout.reward_isolation`): a function
that exits its interpreter on one completion fails that sample only while the others are scored, and the next
call works in a new process; a hung call is killed at its deadline and counted as that sample's failure; runaway
memory is capped; a well-behaved function gives the same values isolated and in-process."""

from __future__ import annotations

import itertools
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from rollout.config import RewardConfig, RolloutConfig
from rollout.reward_isolation import RewardCallFailed, RewardProcesses
from rollout.rewards import RewardSet, hung_reward_calls

USER_REWARDS = '''
import asyncio
import os
import time

def crashes_on_boom(completions, **kwargs):
    """Exits the interpreter (no exception, no cleanup) for a completion holding 'boom'."""
    if "boom" in completions[0]:
        os._exit(1)
    return [float(len(completions[0]))]

def hangs(completions, **kwargs):
    time.sleep(600)
    return [1.0]

def hungry(completions, **kwargs):
    """Runaway memory: 2 GiB at once."""
    block = bytearray(2 << 30)
    return [float(len(block) > 0)]

def pid(completions, **kwargs):
    return [float(os.getpid())]

def mixed(prompts, completions, answer, **kwargs):
    """Values, None (not applicable) and a column, as in-process functions return them."""
    return [None if not a.isdigit() else len(c) / 10 + (a in c) for c, a in zip(completions, answer)]

async def async_len(completions, **kwargs):
    await asyncio.sleep(0.001)
    return [len(completions[0]) / 100]

def first_role(prompts, completions, **kwargs):
    return [float(len(p)) + (c[0]["role"] == "assistant") for p, c in zip(prompts, completions)]

def raises(completions, **kwargs):
    raise ValueError("bad completion")
'''

_ids = itertools.count()


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    """A fresh user module in ``tmp_path`` (a new name per test), importable here and in the reward processes."""
    name = f"isolated_rewards_{next(_ids)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _rewards(mod: str, *entries: tuple[str, float], isolate: bool = True, timeout_s: float = 10.0,
             **knobs) -> RewardSet:
    cfgs = [RewardConfig(fn=fn if fn == "exact_match" else f"{mod}:{fn}", weight=w,
                         isolate=isolate and fn != "exact_match", **knobs) for fn, w in entries]
    return RewardSet(cfgs, timeout_s)


def test_a_crash_fails_that_sample_only_and_the_next_call_works(user_module):
    rs = _rewards(user_module, ("exact_match", 1.0), ("crashes_on_boom", 1.0), processes=2)
    try:
        texts = ["Answer: 4", "boom\nAnswer: 4", "ok, Answer: 4", "no answer"]
        with ThreadPoolExecutor(4) as pool:  # concurrent samples, as a rollout worker scores them
            scores = list(pool.map(lambda t: rs.score("q", t, "4"), texts))
        crashed = scores[1]
        assert crashed[:2] == (0.0, False) and crashed.failed == ("crashes_on_boom",)
        assert crashed.error.startswith("reward 'crashes_on_boom' crashed its reward process")
        assert crashed.terms == {"exact_match": 1.0}  # the other function's value is still reported
        for s, t in zip([scores[0], scores[2], scores[3]], [texts[0], texts[2], texts[3]]):
            assert s.error == "" and s.terms["crashes_on_boom"] == float(len(t))
        assert scores[3].reward == float(len(texts[3])) and scores[0].reward == 1.0 + len(texts[0])
        after = rs.score("q", "again, Answer: 4", "4")  # the pool replaced the dead process
        assert after == (1.0 + len("again, Answer: 4"), True, "")
        assert rs.entries[1][1].replaced >= 1
    finally:
        rs.close()


def test_a_hung_call_is_killed_at_its_deadline_and_counted(user_module):
    rs = _rewards(user_module, ("hangs", 1.0), ("pid", 0.0), timeout_s=1.0)
    try:
        hung_before = hung_reward_calls()
        t0 = time.perf_counter()
        s = rs.score("q", "x", "4")
        took = time.perf_counter() - t0
        assert 1.0 <= took < 5.0
        assert s[:2] == (0.0, False) and s.failed == ("hangs",)
        assert s.error == "reward 'hangs' timed out after 1 s (its reward process was killed)"
        assert rs.entries[0][1].replaced == 1
        time.sleep(0.2)
        assert hung_reward_calls() == hung_before  # no reward thread is left behind: the process was killed
        ok = RewardSet([RewardConfig(fn=f"{user_module}:pid", isolate=True)], 1.0)
        try:
            assert ok.score("q", "x", "4").error == ""
        finally:
            ok.close()
    finally:
        rs.close()


def test_a_call_waits_for_a_free_process_only_until_its_start_deadline(user_module):
    pool = RewardProcesses(f"{user_module}:hangs", processes=1)
    try:
        with ThreadPoolExecutor(1) as t:
            first = t.submit(pool.call, {"completions": ["x"]}, 2.0, time.monotonic() + 5)
            time.sleep(0.5)  # the first call holds the only process
            with pytest.raises(RewardCallFailed, match=r"not started within 0.3 s: all 1 reward processes"):
                pool.call({"completions": ["y"]}, 0.3, time.monotonic() + 0.3)
            with pytest.raises(RewardCallFailed, match="timed out after 2 s"):
                first.result(timeout=30)
    finally:
        pool.close()


def test_runaway_memory_is_capped_in_its_process(user_module):
    rs = _rewards(user_module, ("hungry", 1.0), memory_limit_bytes=512 << 20)
    try:
        s = rs.score("q", "x", "4")
        assert s.failed == ("hungry",) and s.error.startswith("reward 'hungry' raised MemoryError")
    finally:
        rs.close()


def test_isolated_and_in_process_give_the_same_values(user_module):
    entries = [("exact_match", 1.0), ("mixed", 0.5), ("async_len", 2.0), ("raises", 1.0)]
    chat = RewardConfig(fn=f"{user_module}:first_role", format="conversational", weight=3.0)
    cfgs = [RewardConfig(fn=fn if fn == "exact_match" else f"{user_module}:{fn}", weight=w) for fn, w in entries]
    in_process = RewardSet([*cfgs, chat], 10.0)
    isolated = RewardSet([c.model_copy(update={"isolate": c.fn != "exact_match"}) for c in [*cfgs, chat]], 10.0)
    try:
        cases = [("What is 2+2?", "2+2=4\nAnswer: 4", "4"), ("Name it", "Answer: red", "red"), ("q", "", "7")]
        for prompt, text, ref in cases:
            a, b = in_process.score(prompt, text, ref), isolated.score(prompt, text, ref)
            assert a.error.startswith("reward 'raises' raised ValueError: bad completion")
            assert (tuple(a), a.terms, a.failed) == (tuple(b), b.terms, b.failed)
        ok = [c for c in cfgs if not c.fn.endswith(":raises")]
        a = RewardSet([*ok, chat], 10.0).score("q?", "4, Answer: 4", "4")
        iso = RewardSet([c.model_copy(update={"isolate": c.fn != "exact_match"}) for c in [*ok, chat]], 10.0)
        try:
            b = iso.score("q?", "4, Answer: 4", "4")
        finally:
            iso.close()
        assert a.error == "" and (tuple(a), a.terms) == (tuple(b), b.terms)
        assert a.terms["mixed"] == pytest.approx(len("4, Answer: 4") / 10 + 1)
    finally:
        isolated.close()


def test_isolate_config_errors_are_one_line():
    for fn in ("exact_match", "reward_model:judge"):
        with pytest.raises(ValidationError) as e:
            RolloutConfig(rewards=[{"fn": fn, "isolate": True}])
        msg = e.value.errors()[0]["msg"]
        assert "\n" not in msg and f"isolate = true on fn = {fn!r}" in msg and "drop isolate" in msg
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        RewardConfig(fn="exact_match", processes=0)


def test_the_overhead_tool_times_every_way_and_checks_the_values():
    from tooling.reward_isolation_overhead import measure, summary

    rows = summary(measure(calls=3, starts=2))
    assert set(rows) == {"in-process", "reward thread", "isolated", "process start + first call"}
    assert [r["calls"] for r in rows.values()] == [3, 3, 3, 2]
    assert all(0 < r["median_ms"] <= r["p90_ms"] for r in rows.values())
