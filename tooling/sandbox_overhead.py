"""`python -m tooling.sandbox_overhead [--calls N]`: wall-clock cost of one tool call in the sandbox.

Runs the same trivial program (``print(6 * 7)``) N times each way, interleaved so machine load hits every
way alike, and prints the median and 90th percentile per call, in milliseconds:

- ``subprocess``: a bare ``python3 -I -c`` (what any isolation costs on top of);
- ``rlimits only``: `rollout.envs.sandbox.run_python` with ``isolation = "none"`` (the bootstrap and its
  rlimits, no namespaces: the weaker path the sandbox had before bubblewrap);
- ``bubblewrap``: `run_python` as configured by default.

Left out on purpose: heavier tool programs (their own run time is the same in every way) and concurrency
(each call is its own process tree; the machine's cores bound that, not the sandbox).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

from rollout.envs import SandboxConfig, run_python
from rollout.envs.sandbox import resolve_python


def measure(calls: int) -> dict[str, list[float]]:
    """Seconds of each of ``calls`` calls per way (see the module docstring), interleaved.

    Raises:
        RuntimeError: a call did not print 42 (the sandbox does not run here: see `check_sandbox`).
    """
    cfg = SandboxConfig()
    python = resolve_python(cfg)
    ways = {"subprocess": lambda: subprocess.run([python, "-I", "-c", "print(6 * 7)"], capture_output=True,
                                                 text=True, timeout=60).stdout,
            "rlimits only": lambda: run_python("print(6 * 7)", cfg.model_copy(update={"isolation": "none"})).output,
            "bubblewrap": lambda: run_python("print(6 * 7)", cfg).output}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(calls):
        for name, call in ways.items():
            t0 = time.perf_counter()
            out = call()
            seconds[name].append(time.perf_counter() - t0)
            if out.strip() != "42":
                raise RuntimeError(f"{name}: expected 42, got {out.strip()[-300:]!r}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    """Print one line per way: median and p90 milliseconds per call, and the median's excess over a bare
    subprocess."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=40, help="calls per way (default 40)")
    args = parser.parse_args(argv)
    if args.calls < 2:
        parser.error(f"--calls {args.calls}: need at least 2 to report a median and p90")
    seconds = measure(args.calls)
    base = statistics.median(seconds["subprocess"])
    for name, values in seconds.items():
        med, p90 = statistics.median(values), statistics.quantiles(values, n=10)[-1]
        print(f"{name:>13}: median {med * 1e3:6.1f} ms, p90 {p90 * 1e3:6.1f} ms, "  # noqa: T201 (a CLI's report)
              f"+{(med - base) * 1e3:5.1f} ms over a bare subprocess ({len(values)} calls)")


if __name__ == "__main__":
    main()
