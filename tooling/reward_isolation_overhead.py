"""`python -m tooling.reward_isolation_overhead [--calls N] [--out FILE]`: what ``isolate = true`` costs per reward
call.

Calls the built-in ``exact_match`` on the same 8 completions N times each way, interleaved so machine load hits
every way alike, and reports the median, 90th percentile and mean per call in milliseconds:

- ``in-process``: a plain call in this thread;
- ``reward thread``: the call handed to a thread and waited for, as `rollout.rewards.RewardSet` runs a function
  without ``isolate``;
- ``isolated``: `rollout.reward_isolation.RewardProcesses.call` (one process, already started): pickling the
  arguments and the result, the pipe both ways and the process's scheduling.

Also the time to start a process and answer its first call (what a crash or a timeout costs once, before the next
call), over ``--starts`` fresh pools. ``--out`` writes the figures as JSON with the command and the machine.

Left out on purpose: a slow function (its own run time is the same in every way) and concurrency (each process
runs one call at a time; the pool's size, ``processes``, bounds that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from rollout.reward_isolation import RewardProcesses
from rollout.rewards import exact_match

COMPLETIONS = [f"{a} + {b} = {a + b}.\nAnswer: {a + b + (i % 2)}" for i, (a, b) in
               enumerate([(3, 4), (12, 9), (7, 7), (20, 5), (1, 1), (40, 2), (9, 9), (15, 15)])]


def measure(calls: int, starts: int) -> dict[str, list[float]]:
    """Seconds of each of ``calls`` calls per way (see the module docstring), interleaved, and of ``starts``
    process starts with their first call.

    Raises:
        RuntimeError: a way returned other values than the in-process call.
    """
    kwargs = {"prompts": ["q"] * len(COMPLETIONS), "completions": COMPLETIONS,
              "answer": [c.rsplit("= ", 1)[1].split(".")[0] for c in COMPLETIONS]}
    expected = exact_match(**kwargs)
    pool = RewardProcesses("exact_match", processes=1)
    threads = ThreadPoolExecutor(1, thread_name_prefix="reward")
    ways = {"in-process": lambda: exact_match(**kwargs),
            "reward thread": lambda: threads.submit(exact_match, **kwargs).result(timeout=60),
            "isolated": lambda: pool.call(kwargs, 60.0, time.monotonic() + 60.0)}
    seconds: dict[str, list[float]] = {name: [] for name in [*ways, "process start + first call"]}
    try:
        for way in ways.values():  # warm up: imports, the pool's process, the thread
            way()
        for _ in range(calls):
            for name, way in ways.items():
                t0 = time.perf_counter()
                out = way()
                seconds[name].append(time.perf_counter() - t0)
                if list(out) != expected:
                    raise RuntimeError(f"{name}: returned {out!r}, expected {expected!r}")
        for _ in range(starts):
            fresh = RewardProcesses("exact_match", processes=1)
            t0 = time.perf_counter()
            fresh.call(kwargs, 60.0, time.monotonic() + 60.0)
            seconds["process start + first call"].append(time.perf_counter() - t0)
            fresh.close()
    finally:
        pool.close()
        threads.shutdown()
    return seconds


def summary(seconds: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Per way: ``median_ms``, ``p90_ms``, ``mean_ms`` and ``calls``."""
    return {name: {"median_ms": round(statistics.median(v) * 1e3, 4),
                   "p90_ms": round(statistics.quantiles(v, n=10)[-1] * 1e3, 4),
                   "mean_ms": round(statistics.fmean(v) * 1e3, 4), "calls": len(v)} for name, v in seconds.items()}


def main(argv: list[str] | None = None) -> None:
    """Print one line per way (median, p90, mean per call; the median's excess over a reward thread) and write
    ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per way (default 1000)")
    parser.add_argument("--starts", type=int, default=10, help="fresh processes timed (default 10)")
    parser.add_argument("--out", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if args.calls < 2 or args.starts < 2:
        parser.error(f"--calls {args.calls} / --starts {args.starts}: need at least 2 each for a median and p90")
    rows = summary(measure(args.calls, args.starts))
    base = rows["reward thread"]["median_ms"]
    for name, r in rows.items():
        extra = "" if name.startswith("process") else f", +{r['median_ms'] - base:.3f} ms over a reward thread"
        print(f"{name:>26}: median {r['median_ms']:8.3f} ms, p90 {r['p90_ms']:8.3f} ms, "  # noqa: T201 (a CLI's report)
              f"mean {r['mean_ms']:8.3f} ms ({r['calls']} calls){extra}")
    if args.out:
        record = {"command": "python -m tooling.reward_isolation_overhead " + " ".join(argv or sys.argv[1:]),
                  "recorded": time.strftime("%Y-%m-%d %H:%M:%S"), "completions_per_call": len(COMPLETIONS),
                  "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                              "python": platform.python_version()},
                  "per_call": rows,
                  "isolated_minus_reward_thread_median_ms": round(rows["isolated"]["median_ms"] - base, 4)}
        with open(args.out, "w") as f:
            f.write(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
