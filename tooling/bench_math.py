"""The arithmetic and the table of `relayrl bench`: ratios, targets, Markdown/JSON rendering.

Pure functions, no Ray or torch, so they are unit-tested in milliseconds (tests/unit/test_bench_math.py).
`tooling.bench` does the measuring.

Left out on purpose: statistics beyond means and medians (a benchmark here runs a handful of repeats).
"""

from __future__ import annotations

import math
import os
import statistics
import time

Row = dict  # {"value": float, "unit": str, "target": str, "met": bool | None}


def row(value: float, unit: str, target: tuple[str, float] | None = None) -> Row:
    """One table row; ``target`` is ``("<=", bound)`` or ``(">=", bound)`` and sets ``met``.

    Raises:
        ValueError: an unknown comparison in ``target``.
    """
    if target is None:
        return {"value": float(value), "unit": unit, "target": "", "met": None}
    op, bound = target
    if op not in ("<=", ">="):
        raise ValueError(f"target comparison {op!r} is not '<=' or '>='")
    ok = value <= bound if op == "<=" else value >= bound
    return {"value": float(value), "unit": unit, "target": f"{op} {bound:g}", "met": bool(ok and math.isfinite(value))}


def spread_row(values: list[float], unit: str, target: tuple[str, float] | None = None) -> Row:
    """One table row of a repeated measurement: `row` of the median (``target`` is checked on it), plus
    ``min``, ``median``, ``max`` and ``n`` (the number of values).

    Raises:
        ValueError: no values, or an unknown comparison in ``target``.
    """
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError(f"a row of a repeated measurement needs at least one value (unit {unit!r}), got none")
    med = statistics.median(vals)
    return {**row(med, unit, target), "min": min(vals), "median": med, "max": max(vals), "n": len(vals)}


def step_values(records: list[dict], key: str) -> list[float]:
    """``key`` of every step 2.. of a run's metrics records, in step order (step 1 carries start-up, as in
    `run_throughput`).

    Raises:
        ValueError: no step from 2 on has ``key``.
    """
    vals = [r[key] for r in sorted(records, key=lambda r: r.get("step", 0)) if r.get("step", 0) >= 2 and key in r]
    if not vals:
        raise ValueError(f"a run needs at least 2 steps with {key!r} (step 1 is excluded); raise --steps")
    return vals


def rate(amount: float, seconds: float) -> float:
    """``amount / seconds`` (tokens/s, samples/s, bytes/s).

    Raises:
        ValueError: ``seconds`` is not positive.
    """
    if not seconds > 0:
        raise ValueError(f"a rate needs a positive duration, got {seconds!r} s")
    return amount / seconds


def overhead_pct(raw_per_s: float, wrapped_per_s: float) -> float:
    """Extra seconds per generated token of the wrapper over raw vLLM, in percent:
    ``(t_wrapped / t_raw - 1) * 100`` with ``t = 1 / (tokens/s)``."""
    return (raw_per_s / wrapped_per_s - 1.0) * 100.0


def paired_overhead_pct(raw_calls: list[tuple[float, float]], wrapped_calls: list[tuple[float, float]]) -> float:
    """Median over paired calls (same prompts and seeds) of `overhead_pct`; each call is ``(tokens, seconds)``.

    Pairing and the median keep a slow moment of a shared machine from landing on one side only.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    if not raw_calls or len(raw_calls) != len(wrapped_calls):
        raise ValueError(f"need equally many paired calls, got {len(raw_calls)} raw and {len(wrapped_calls)} wrapped")
    return statistics.median(overhead_pct(rate(*r), rate(*w)) for r, w in zip(raw_calls, wrapped_calls))


def ideal_speedup(gen_per_s: float, train_per_s: float) -> float:
    """Best async/sync speedup when generation (G samples/s) and training (T samples/s) fully overlap:
    ``(1/G + 1/T) / max(1/G, 1/T)``, between 1 and 2."""
    g, t = 1.0 / gen_per_s, 1.0 / train_per_s
    return (g + t) / max(g, t)


def overlap_efficiency(async_per_s: float, gen_per_s: float, train_per_s: float) -> float:
    """Async run throughput over the slower stage's stand-alone throughput, ``A / min(G, T)`` (1 = perfect)."""
    return async_per_s / min(gen_per_s, train_per_s)


def run_throughput(records: list[dict], samples_per_step: int) -> float:
    """Trained samples/s of a run from its metrics records: ``samples_per_step / mean(perf/step_seconds)``
    over steps 2.. (step 1 carries start-up: engines warming, the first batch generated from nothing).

    Raises:
        ValueError: the run has fewer than 2 steps with ``perf/step_seconds``.
    """
    secs = [r["perf/step_seconds"] for r in records if r.get("step", 0) >= 2 and "perf/step_seconds" in r]
    if not secs:
        raise ValueError("a run needs at least 2 steps to measure throughput (step 1 is excluded); raise --steps")
    return samples_per_step / statistics.fmean(secs)


def learner_busy_frac(records: list[dict]) -> float:
    """Mean ``learner/seconds`` over mean ``perf/step_seconds``, steps 2..: near 1 means the learner set the pace.

    Raises:
        ValueError: the run has fewer than 2 steps with both keys.
    """
    recs = [r for r in records if r.get("step", 0) >= 2 and "perf/step_seconds" in r and "learner/seconds" in r]
    if not recs:
        raise ValueError("a run needs at least 2 steps to measure learner load (step 1 is excluded); raise --steps")
    return statistics.fmean(r["learner/seconds"] for r in recs) / statistics.fmean(r["perf/step_seconds"] for r in recs)


def proc_status_bytes(status: str) -> dict[str, int]:
    """``{"VmHWM": peak resident set, "VmRSS": resident set now}`` in bytes, from the text of a Linux
    ``/proc/<pid>/status`` (which gives them in kB, meaning KiB: proc(5)).

    Raises:
        ValueError: either line is missing (not Linux, or a kernel thread).
    """
    out = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            number, unit = value.split()
            if unit != "kB":
                raise ValueError(f"/proc status line {line!r}: expected a value in kB")
            out[key] = int(number) * 1024
    missing = sorted({"VmHWM", "VmRSS"} - set(out))
    if missing:
        raise ValueError(f"/proc status has no {missing} line(s): peak host memory needs Linux's /proc/<pid>/status")
    return out


def phase_memory(readings: list[tuple[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    """Per phase of one process: its peak resident set, the resident set after it, and how far the peak rose
    above the resident set the phase started from, in bytes.

    Args:
        readings: ``(phase, proc_status_bytes(...))`` taken at the end of each phase, in order, the peak
            (``VmHWM``) reset to the current resident set right after each reading; the first phase starts at
            process start (resident set 0).

    Returns:
        ``phase -> {"peak": VmHWM, "rss": VmRSS, "rise": VmHWM - VmRSS of the previous reading}``.
    """
    out, before = {}, 0
    for phase, r in readings:
        out[phase] = {"peak": r["VmHWM"], "rss": r["VmRSS"], "rise": r["VmHWM"] - before}
        before = r["VmRSS"]
    return out


def fmt(value: float) -> str:
    """Compact number for the table: 3 significant figures, integers without decimals."""
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def table(results: dict[str, dict[str, Row]]) -> list[str]:
    """Markdown table lines: benchmark, metric, value, target, met? A repeated measurement (`spread_row`)
    shows its median, then its min and max over its n values."""
    lines = ["| benchmark | metric | value | target | met? |", "|---|---|---|---|---|"]
    for bench, rows in results.items():
        for metric, r in rows.items():
            met = {True: "yes", False: "**no**", None: ""}[r["met"]]
            value = f"{fmt(r['value'])} {r['unit']}".strip()
            if r.get("n", 1) > 1:
                value += f" (min {fmt(r['min'])}, max {fmt(r['max'])}, n={r['n']})"
            lines.append(f"| {bench} | {metric} | {value} | {r['target']} | {met} |")
    return lines


def render(results: dict[str, dict[str, Row]], command: str, config: str, notes: list[str]) -> str:
    """The Markdown page: how it was produced, the table, then notes (one paragraph each)."""
    lines = ["## relayrl benchmarks", "", f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} "
             f"({os.cpu_count()} CPUs, all benchmarks in that one invocation, one after the other). "
             f"Run config `{config}`.", "", *table(results)]
    for note in notes:
        lines += ["", note.strip()]
    return "\n".join(lines) + "\n"


def to_json(results: dict[str, dict[str, Row]], command: str, config: str, notes: list[str],
            raw: dict[str, dict]) -> dict:
    """What goes in the ``.json`` next to the Markdown: flat rows plus each benchmark's raw measurements."""
    rows = [{"benchmark": b, "metric": m, **r} for b, rs in results.items() for m, r in rs.items()]
    return {"command": command, "config": config, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "cpus": os.cpu_count(), "rows": rows, "raw": raw, "notes": notes}
