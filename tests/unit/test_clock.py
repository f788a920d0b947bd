"""`RunClock`: step time, learner wait, the time budget and the checkpointed totals, on a hand-driven clock."""

from __future__ import annotations

import json
import time

import pytest

from orchestrator.clock import RunClock


@pytest.fixture
def now(monkeypatch) -> list[float]:
    """``time.perf_counter`` reads ``now[0]``; a test moves it by hand."""
    t = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: t[0])
    return t


def test_steps_add_up_and_exclude_what_happens_between_restarts(now):
    clock = RunClock()
    clock.restart()  # the run starts at 100
    now[0] = 103.0
    clock.learner_busy()  # the learner waited 3 s for its first batch
    now[0] = 110.0
    m = clock.end_step(16)
    assert m == {"perf/learner_wait_seconds": 3.0, "perf/step_seconds": 10.0, "perf/train_seconds": 10.0,
                 "perf/learner_wait_frac": 0.3}
    now[0] = 150.0  # a held-out eval and a checkpoint write: not training time
    clock.restart()
    now[0] = 151.0
    clock.learner_busy()
    now[0] = 155.0
    m = clock.end_step(16)
    assert m["perf/step_seconds"] == 5.0 and m["perf/train_seconds"] == 15.0
    assert m["perf/learner_wait_seconds"] == 1.0  # the first step's wait was not counted again
    assert clock.trained_samples == 32 and clock.samples_per_s() == pytest.approx(32 / 15)


def test_time_budget_counts_the_running_step(now):
    clock = RunClock(train_seconds=50.0)
    clock.restart()
    now[0] = 109.0
    assert not clock.out_of_time(60.0) and not clock.out_of_time(0.0)
    now[0] = 110.0
    assert clock.out_of_time(60.0)
    assert not clock.out_of_time(0.0)  # 0: no budget


def test_state_dict_round_trip_keeps_the_totals_and_restarts_the_clocks(now):
    a = RunClock()
    a.restart()
    now[0] = 112.5
    a.end_step(24)
    b = RunClock()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # through the checkpoint's JSON
    assert (b.train_seconds, b.trained_samples) == (12.5, 24)
    assert b.state_dict() == a.state_dict() == {"train_seconds": 12.5, "trained_samples": 24}
