"""`orchestrator.dispatch.Dispatcher.restart_hung`: a hung rollout worker is restarted (counted) until its slot has
used ``rollout.max_restarts`` restarts for hangs; one more hang stops the run naming the worker and the cause. A
request sent to an earlier incarnation of a slot restarts nothing (that worker was already replaced)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from buffer import GenerateRequest, Problem
from orchestrator.dispatch import Dispatcher, InFlight
from orchestrator.tally import RolloutTally


def _dispatcher(max_restarts: int):
    rollout = SimpleNamespace(incarnation={0: 0, 1: 0})
    cfg = SimpleNamespace(rollout=SimpleNamespace(max_restarts=max_restarts))
    d = Dispatcher(cfg, rollout, None, None, RolloutTally(0.1), None, None, None)
    recovered = []

    def recover(f, err, replace=False):  # what the real one does to a slot: a new actor there
        recovered.append((f.worker, replace, str(err)))
        rollout.incarnation[f.worker] += 1
    d._recover = recover
    return d, rollout, recovered


def _request(worker: int, incarnation: int) -> InFlight:
    req = GenerateRequest((Problem("train/0", "1 + 1", "2"),), ("g0",), (4,), 0, 0)
    return InFlight(req, worker, incarnation, 0.0)


def test_a_hung_worker_is_restarted_until_its_slot_spent_max_restarts():
    d, rollout, recovered = _dispatcher(max_restarts=2)
    d.restart_hung(_request(1, 0), TimeoutError("generate request g0..g0 (1 groups) did not finish"))
    d.restart_hung(_request(1, 1), RuntimeError("environment 'x': 3 reset/step calls ..."))
    d.restart_hung(_request(0, 0), TimeoutError("slow"))  # another slot has its own budget
    assert [(w, replace) for w, replace, _ in recovered] == [(1, True), (1, True), (0, True)]
    assert d.tally.worker_restarts_hung == 3 and d.tally.step_metrics(1.0, 1)["rollout/worker_restarts_hung"] == 3
    with pytest.raises(RuntimeError, match=r"^rollout worker 1 hung: generate request g0..g0 \(1 groups\) did not "
                                           r"finish \(it was restarted for hangs 2 times, rollout.max_restarts = 2\)"):
        d.restart_hung(_request(1, 2), TimeoutError("generate request g0..g0 (1 groups) did not finish"))
    assert len(recovered) == 3


def test_a_request_of_an_earlier_incarnation_is_reissued_without_a_restart():
    d, rollout, recovered = _dispatcher(max_restarts=0)  # no restart left: a restart would stop the run
    rollout.incarnation[1] = 1  # the worker that held the request was replaced since it was sent
    d.restart_hung(_request(1, 0), TimeoutError("slow"))
    assert recovered == [(1, True, "slow")] and d.tally.worker_restarts_hung == 0  # re-issued, nothing restarted


def test_the_hung_restart_count_survives_a_resume():
    t = RolloutTally(0.1)
    t.worker_restarts_hung = 2
    back = RolloutTally(0.1)
    back.load_state_dict(t.state_dict())
    assert back.worker_restarts_hung == 2
    old = t.state_dict()
    del old["worker_restarts_hung"]  # a checkpoint written before the counter existed
    back.load_state_dict(old)
    assert back.worker_restarts_hung == 0
