"""Process isolation for reward functions (``isolate = true`` on a ``[[rollout.rewards]]`` entry).

An isolated function runs in a small pool of persistent worker processes of its own (`RewardProcesses`), one
call per process at a time, each process a one-worker `concurrent.futures.ProcessPoolExecutor` (forkserver start
where the platform has it, else spawn). What that buys over the reward threads of `rollout.rewards`:

- a call that crashes its interpreter (``os._exit``, a segfault in a C extension, the kernel's OOM kill) breaks
  only its own process: that call fails (the sample's reward failure, ``rollout/reward_failures/<name>``), the
  process is replaced before its next call, and the rollout worker lives;
- a call past its budget is killed (SIGKILL to its process), so a hung function holds no thread or process for
  the worker's life;
- each process's heap is capped (``RLIMIT_DATA``, the entry's ``memory_limit_bytes``): runaway memory raises
  ``MemoryError`` in that process (or kills it) instead of taking the node's memory.

A call waits for a free process at most until its start deadline (the reward budget from when it was
submitted), then runs at most ``rollout.reward_timeout_s``. The first call in a new process also imports the
function's module there. Arguments and results cross by pickle: a function must return a picklable list.
The cost per call is measured by ``python -m tooling.reward_isolation_overhead`` (docs/bring_your_own_task.md).

Left out on purpose: a sandbox (the process has the worker's user, files and network; the tool sandbox,
`rollout.envs.sandbox`, is the place for untrusted code), and batching several samples into one call.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures.process import BrokenProcessPool
from typing import Any

logger = logging.getLogger(__name__)

PROCESS_START_TIMEOUT_S = 60.0  # a new process answers its first call (its pid) within this, or the call fails


class RewardCallFailed(Exception):
    """An isolated call that did not return: not started in time, killed at its deadline, or its process died.
    The message is the failure's reason as a sample's error shows it."""


# ---- the child's side ---------------------------------------------------------------------------------------
_CHILD_FUNCTIONS: dict[str, Any] = {}


def _init_child(memory_limit_bytes: int) -> None:
    """Runs once in each new process: cap its heap (`RLIMIT_DATA`, bytes; 0: no cap)."""
    if memory_limit_bytes:
        import resource

        resource.setrlimit(resource.RLIMIT_DATA, (memory_limit_bytes, memory_limit_bytes))


def _child_call(fn: str, kwargs: dict[str, Any], sys_path: tuple[str, ...] | None) -> Any:
    """In the child: call the reward function ``fn`` (a name `rollout.rewards.resolve_reward` knows, imported
    once per process) with ``kwargs``; an ``async`` function runs to completion here (the parent bounds it)."""
    import asyncio
    import inspect

    if sys_path is not None:  # the parent's import path changed since this process last heard it
        sys.path[:] = list(sys_path)
    obj = _CHILD_FUNCTIONS.get(fn)
    if obj is None:
        from rollout.rewards import resolve_reward

        obj = _CHILD_FUNCTIONS[fn] = resolve_reward(fn)
    out = obj(**kwargs)
    return asyncio.run(out) if inspect.isawaitable(out) else out


# ---- the parent's side --------------------------------------------------------------------------------------
def _context() -> mp.context.BaseContext:
    """forkserver (new processes fork from a small server, not from this threaded process) where the platform has
    it, else spawn. The server preloads this module instead of the default ``__main__``: a driver script without
    an ``if __name__ == "__main__"`` guard must not run again in it (no effect once this process's forkserver
    runs)."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


class _Process:
    """One worker process: a one-worker `ProcessPoolExecutor` and the pid it reported (to kill it)."""

    def __init__(self, memory_limit_bytes: int) -> None:
        self.executor = cf.ProcessPoolExecutor(1, mp_context=_context(), initializer=_init_child,
                                               initargs=(memory_limit_bytes,))
        self.sys_path: tuple[str, ...] | None = None
        self.alive = True
        first = self.executor.submit(os.getpid)
        done, _ = cf.wait([first], timeout=PROCESS_START_TIMEOUT_S)
        if not done:
            self.executor.shutdown(wait=False, cancel_futures=True)
            raise RewardCallFailed(f"its reward process did not start within {PROCESS_START_TIMEOUT_S:g} s")
        try:
            self.pid = first.result()
        except BrokenProcessPool as e:
            self.executor.shutdown(wait=False, cancel_futures=True)
            raise RewardCallFailed(f"its reward process died at start ({e})") from None

    def kill(self) -> None:
        """SIGKILL the process (it may be gone already) and drop the executor."""
        self.alive = False
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.executor.shutdown(wait=False, cancel_futures=True)


class RewardProcesses:
    """A pool of ``processes`` worker processes that run one reward function's calls, one call per process.

    Args:
        fn: the reward function as ``rollout.rewards.fn`` names it (a built-in name or ``"pkg.module:function"``),
            imported by name in each process.
        processes: processes in the pool, started on first use (each holds an interpreter and the function's
            imports: tens of MB and up).
        memory_limit_bytes: heap cap of each process (``RLIMIT_DATA``), 0: none.

    Attributes:
        replaced: processes killed (past their deadline) or found dead after a call, each replaced on next use.
    """

    def __init__(self, fn: str, processes: int = 2, memory_limit_bytes: int = 4 << 30) -> None:
        if processes < 1:
            raise ValueError(f"RewardProcesses: processes = {processes}; give at least 1")
        self.fn, self.processes, self.memory_limit_bytes = fn, processes, memory_limit_bytes
        self.replaced = 0
        self._free: queue.Queue[_Process | None] = queue.Queue()
        for _ in range(processes):
            self._free.put(None)  # None: not started yet (or replaced): started when taken
        self._lock = threading.Lock()
        self._all: set[_Process] = set()

    def call(self, kwargs: dict[str, Any], timeout_s: float, start_by: float) -> Any:
        """Run the function on ``kwargs`` in a free process and return its output.

        Args:
            timeout_s: seconds the call may run, from when a process takes it up.
            start_by: `time.monotonic` deadline for a process to take it up.

        Raises:
            RewardCallFailed: no process free by ``start_by``, the call ran past ``timeout_s`` (its process
                killed), or its process died (crashed, exited, killed by the kernel); one line saying which.
            Exception: whatever the function raised in its process (re-raised here by `concurrent.futures`).
        """
        try:
            proc = self._free.get(timeout=max(0.0, start_by - time.monotonic()))
        except queue.Empty:
            raise RewardCallFailed(f"not started within {timeout_s:g} s: all {self.processes} reward processes of "
                                   f"{self.fn!r} busy") from None
        try:
            if proc is None or not proc.alive:
                proc = self._start()
            path = tuple(sys.path)
            try:
                future = proc.executor.submit(_child_call, self.fn, kwargs, None if path == proc.sys_path else path)
            except BrokenProcessPool:  # it died while idle (e.g. the kernel's OOM kill): start another for this call
                self._retire(proc, "died while idle")
                proc = self._start()
                future = proc.executor.submit(_child_call, self.fn, kwargs, path)
            proc.sys_path = path
            done, _ = cf.wait([future], timeout=timeout_s)
            if not done:
                self._retire(proc, f"killed after {timeout_s:g} s")
                proc = None
                raise RewardCallFailed(f"timed out after {timeout_s:g} s (its reward process was killed)")
            try:
                return future.result()
            except BrokenProcessPool:
                self._retire(proc, "died")
                proc = None
                raise RewardCallFailed("crashed its reward process (it exited, took a signal or ran out of memory); "
                                       "the process is replaced") from None
        finally:
            self._free.put(proc)

    def _start(self) -> _Process:
        proc = _Process(self.memory_limit_bytes)
        with self._lock:
            self._all.add(proc)
        return proc

    def _retire(self, proc: _Process, why: str) -> None:
        logger.warning("reward %r: process %d %s; replaced on its next call", self.fn, proc.pid, why)
        proc.kill()
        with self._lock:
            self._all.discard(proc)
            self.replaced += 1

    def close(self) -> None:
        """Kill every process of the pool (a call running in one fails as crashed); a later call starts new
        ones."""
        with self._lock:
            procs, self._all = list(self._all), set()
        for p in procs:
            p.kill()

