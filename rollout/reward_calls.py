"""Time-bounded reward calls: each call runs in one of ``REWARD_THREADS`` threads of this process, bounded by
its budget from the moment a thread takes it up (`rollout.rewards` describes what a failure costs). An isolated
function (`rollout.reward_isolation.RewardProcesses`) is handed by its thread to a process of its own pool."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import math
import threading
import time
from collections.abc import Callable
from typing import Any

from rollout.reward_isolation import PROCESS_START_TIMEOUT_S, RewardCallFailed, RewardProcesses

REWARD_THREADS = 16  # threads of this process that run reward calls
_POOL: cf.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_ABANDONED: list[cf.Future] = []  # calls past their deadline, still running (their threads cannot be killed)


class _AsyncTimeout(Exception):
    """An async reward function's ``await`` outlived the budget (cancelled in its thread)."""


def _pool() -> cf.ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = cf.ThreadPoolExecutor(max_workers=REWARD_THREADS, thread_name_prefix="reward")
        return _POOL


def hung_reward_calls() -> int:
    """Reward calls of this process abandoned at their deadline and still running."""
    with _POOL_LOCK:
        _ABANDONED[:] = [f for f in _ABANDONED if not f.done()]
        return len(_ABANDONED)


class _Call:
    """One reward call submitted to the reward threads; `result` waits for it within its budget.

    ``fn`` may be a `RewardProcesses` pool (an isolated function): the reward thread then hands the call to a free
    process of it, by the same start deadline, and the pool bounds the call itself (it kills a call past its
    budget), so the thread always comes back.
    """

    def __init__(self, fn: Callable[..., Any] | RewardProcesses, args: tuple, kwargs: dict,
                 timeout_s: float) -> None:
        self.timeout_s, self.started = timeout_s, threading.Event()
        self.start_by = time.monotonic() + timeout_s
        self.isolated = isinstance(fn, RewardProcesses)

        async def bounded(awaitable):
            try:
                return await asyncio.wait_for(awaitable, timeout_s)
            except asyncio.TimeoutError:
                raise _AsyncTimeout from None

        def job():
            self.started.set()
            if self.isolated:
                return fn.call(kwargs, timeout_s, self.start_by)
            out = fn(*args, **kwargs)
            return asyncio.run(bounded(out)) if inspect.isawaitable(out) else out

        self.future = _pool().submit(job)

    def result(self) -> tuple[Any, str]:
        """``(value, "")``, or ``(None, why)`` when the call raised, timed out or never started."""
        t = self.timeout_s
        if not self.started.wait(t) and self.future.cancel():
            return None, (f"not started within {t:g} s: all {REWARD_THREADS} reward threads busy "
                          f"({hung_reward_calls()} hung reward calls in this worker)")
        self.started.wait()  # it started just as the wait ended
        # an isolated call bounds itself (start deadline, a new process's start, its budget): wait that out
        wait = max(0.0, self.start_by - time.monotonic()) + PROCESS_START_TIMEOUT_S + t + 5.0 if self.isolated else t
        try:
            return self.future.result(timeout=wait), ""
        except RewardCallFailed as e:
            return None, str(e)
        except cf.TimeoutError:
            with _POOL_LOCK:
                _ABANDONED.append(self.future)
            return None, f"timed out after {t:g} s"
        except _AsyncTimeout:
            return None, f"timed out after {t:g} s"
        except Exception as e:  # any failure of user reward code is recorded, not raised
            return None, f"raised {type(e).__name__}: {e}"[:300]


def score_safely(fn, text: str, reference: str, timeout_s: float) -> tuple[float, bool, str]:
    """Run reward function ``fn(text, reference) -> (reward, correct)`` with a time budget.

    Returns ``(reward, correct, error)``; ``error`` is ``""`` on success, else the reason
    (``"raised ValueError: ..."`` or ``"timed out after 2.0 s"``) with reward 0.0 and correct False.
    A reward function that never returns keeps one reward thread busy; the caller moves on. A
    non-finite reward counts as an error too.
    """
    out, error = _Call(fn, (text, reference), {}, timeout_s).result()
    if error:
        return 0.0, False, error
    reward, correct = out
    if not math.isfinite(float(reward)):
        return 0.0, False, f"returned a non-finite reward {reward!r}"
    return float(reward), bool(correct), ""
