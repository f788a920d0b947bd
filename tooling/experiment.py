"""`relayrl experiment SPEC.toml`: run named variants of one config and write a comparison table.

A spec names a base run config, overrides shared by every variant (typically a wall-clock budget,
``time_budget_s``) and a list of variants, each a name plus overrides. Every variant runs as its own
``relayrl train`` subprocess (a fresh Ray instance, nothing shared), one after the other, so they
get the same machine. The table is written as Markdown and JSON, with the command that produced it.

Column specs read a run dir: ``summary:<key>`` (the run's summary.json), ``first:<key>`` (first
record that has it), ``mean:<key>`` / ``sum:<key>`` / ``max:<key>`` over training steps, and
``curve:<key>`` (``value@step`` for every record that has the key), and ``reach:<key>>=<x>``
(training seconds, ``perf/train_seconds``, at the first record where the key reaches x: the
time-to-accuracy column).

A variant runs ``relayrl train`` or, with ``runner = "trl"``, the TRL GRPOTrainer baseline on the
same config (``relayrl trl-baseline``, `tooling.trl_baseline`).

``seeds = [1, 2]`` runs every variant once per seed (override ``seed=S``: prompt order, sampling and
the learner's RNG); the table then has a row per run and a second table across seeds, each numeric
column as ``mean (min-max)``, ``reach`` as the mean seconds of the seeds that reached the threshold
with how many did, ``curve`` as the mean per step. The JSON keeps each run's summary and the metrics
records the columns read, so the tables can be rebuilt without the run dirs.

Left out on purpose: running variants in parallel (they would compete for the same cores).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(min_length=1, description="row label")
    overrides: list[str] = Field(default_factory=list, description="dotted overrides of this variant")
    runner: Literal["relayrl", "trl"] = Field("relayrl", description="relayrl train, or TRL's GRPOTrainer")


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    title: str = Field(min_length=1, description="table heading")
    config: str = Field(description="base run config (TOML), relative to the working directory")
    overrides: list[str] = Field(default_factory=list, description="overrides shared by every variant")
    columns: list[tuple[str, str]] = Field(description="(header, column spec) pairs, see module docstring")
    variants: list[Variant] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=list, description="run each variant once per seed (empty: once, "
                             "with the config's seed)")
    notes: str = Field("", description="text printed under the table")

    def runs(self) -> list[tuple[str, Variant, list[str]]]:
        """``(row label, variant, extra overrides)`` of every run, variant-major."""
        if not self.seeds:
            return [(v.name, v, []) for v in self.variants]
        return [(f"{v.name}, seed {s}", v, [f"seed={s}"]) for v in self.variants for s in self.seeds]


def load_spec(path: str | Path) -> ExperimentSpec:
    """Parse an experiment spec.

    Raises:
        ValueError: missing file, bad TOML, or a field that fails validation (named).
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"experiment spec {str(p)!r} does not exist")
    try:
        return ExperimentSpec.model_validate(tomllib.loads(p.read_text()))
    except (tomllib.TOMLDecodeError, ValidationError) as e:
        raise ValueError(f"experiment spec {str(p)!r} is invalid: {e}") from None


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """``(metrics records, summary)`` of a finished run dir."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return recs, summary


def column_value(spec: str, recs: list[dict], summary: dict) -> str:
    """Evaluate one column spec on a run; ``-`` when the run has no such value.

    Raises:
        ValueError: unknown aggregation prefix.
    """
    how, _, key = spec.partition(":")
    steps = [r for r in recs if r.get("step", 0) > 0]
    vals = [r[key] for r in steps if r.get(key) is not None]
    if how == "summary":
        v = summary.get(key)
    elif how == "first":
        v = next((r[key] for r in recs if r.get(key) is not None), None)
    elif how in ("mean", "sum", "max"):
        v = {"mean": statistics.fmean, "sum": sum, "max": max}[how](vals) if vals else None
    elif how == "reach":
        return _reach(spec, key, recs)
    elif how == "curve":
        return ", ".join(f"{r[key]:.3f}@{r['step']}" for r in recs if r.get(key) is not None) or "-"
    else:
        raise ValueError(f"column spec {spec!r}: unknown aggregation {how!r} "
                         "(summary/first/mean/sum/max/curve/reach)")
    if v is None:
        return "-"
    if isinstance(v, float) and not v.is_integer():
        return f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.3f}"
    return str(int(v)) if isinstance(v, float) else str(v)


def column_number(spec: str, recs: list[dict], summary: dict) -> float | None:
    """The number behind a column: its value for summary/first/mean/sum/max, the training seconds at the
    crossing for ``reach`` (None if not reached); None for ``curve`` or a missing value."""
    how, _, key = spec.partition(":")
    if how == "reach":
        hit = _first_reaching(spec, key, recs)
        return None if hit is None else float(hit.get("perf/train_seconds", 0.0))
    if how == "curve":
        return None
    v = column_value(spec, recs, summary)
    try:
        return float(v)
    except ValueError:
        return None


def across_seeds(spec: str, runs: list[tuple[list[dict], dict]]) -> str:
    """One cell of the across-seeds table for column ``spec`` over ``runs`` ((records, summary) each)."""
    how, _, key = spec.partition(":")
    if how == "curve":
        by_step: dict[int, list[float]] = {}
        for recs, _ in runs:
            for r in recs:
                if r.get(key) is not None:
                    by_step.setdefault(r["step"], []).append(r[key])
        return ", ".join(f"{statistics.fmean(v):.3f}@{s}" for s, v in sorted(by_step.items())
                         if len(v) == len(runs)) or "-"
    nums = [column_number(spec, recs, summary) for recs, summary in runs]
    got = [x for x in nums if x is not None]
    if not got:
        return f"not reached (0 of {len(runs)})" if how == "reach" else "-"
    cell = f"{_fmt(statistics.fmean(got))} ({_fmt(min(got))}-{_fmt(max(got))})"
    if how == "reach":
        cell = f"{statistics.fmean(got):.0f} s ({min(got):.0f}-{max(got):.0f}), {len(got)} of {len(runs)} reached"
    return cell


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e-2 and v else (f"{v:.3f}" if not v.is_integer() else str(int(v)))


def _first_reaching(spec: str, key: str, recs: list[dict]) -> dict | None:
    """``reach:<key>>=<x>``: the first record with ``key >= x``, or None.

    Raises:
        ValueError: ``key`` is not ``<name>>=<number>``.
    """
    name, _, x = key.partition(">=")
    try:
        threshold = float(x)
    except ValueError:
        threshold = None
    if not name or threshold is None:
        raise ValueError(f"column spec {spec!r}: expected reach:<key>>=<number>")
    return next((r for r in recs if r.get(name) is not None and r[name] >= threshold), None)


def _reach(spec: str, key: str, recs: list[dict]) -> str:
    """``reach:<key>>=<x>``: ``"<s> s @ step N"`` at the first record with ``key >= x``, else
    ``"not reached (<s> s, N steps)"`` with the run's last training seconds and step."""
    r = _first_reaching(spec, key, recs)
    if r is not None:
        return f"{r.get('perf/train_seconds', 0.0):.0f} s @ step {r['step']}"
    last = max(recs, key=lambda r: r.get("step", 0)) if recs else {}
    return f"not reached ({last.get('perf/train_seconds', 0.0):.0f} s, {last.get('step', 0)} steps)"


def run_variant(spec: ExperimentSpec, variant: Variant, out_root: Path, timeout_s: float,
                label: str | None = None, extra: list[str] = ()) -> Path:
    """Train one variant (with ``extra`` overrides, e.g. a seed) in a subprocess; returns its run dir.

    Raises:
        RuntimeError: the run failed (exit code and the tail of its log in the message).
        TimeoutError: it ran past ``timeout_s``.
    """
    label = label or variant.name
    slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")
    out = out_root / slug
    command = ["train", "-q"] if variant.runner == "relayrl" else ["trl-baseline"]
    cmd = [sys.executable, "-m", "orchestrator.cli", *command, spec.config, *spec.overrides, *variant.overrides,
           *extra, f"name={slug}", f"output_dir={out}"]
    logger.info("run %r: %s", label, " ".join(cmd[2:]))
    log = out_root / f"{slug}.log"
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"run {label!r} ran past {timeout_s:.0f} s; log: {log}") from None
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"run {label!r} exited {rc}; log {log}:\n{tail}")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def render(spec: ExperimentSpec, rows: list[tuple[str, list[str]]], command: str, rerun: list[str] = (),
           seed_rows: list[tuple[str, list[str]]] = ()) -> str:
    """Markdown: heading, how to reproduce, the table (and the across-seeds table), notes, and which
    rows a later ``--only`` reran."""
    head = ["variant", *(h for h, _ in spec.columns)]
    lines = [f"## {spec.title}", "", f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} "
             f"({os.cpu_count()} CPUs). Base config `{spec.config}`, shared overrides "
             f"`{' '.join(spec.overrides) or '-'}`" + (f", seeds {', '.join(map(str, spec.seeds))}" if spec.seeds
                                                      else "") + ".", ""]
    if seed_rows:
        lines += [f"Across seeds (mean (min-max) over {len(spec.seeds)} seeds):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join([name, *vals]) + " |" for name, vals in seed_rows]
        lines += ["", "Each run:", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([name, *vals]) + " |" for name, vals in rows]
    if rerun:
        lines += ["", "Rows rerun afterwards with `--only` (the others kept from the earlier run): "
                  + ", ".join(f"`{n}`" for n in rerun) + "."]
    if spec.notes:
        lines += ["", spec.notes.strip()]
    return "\n".join(lines) + "\n"


def _kept_records(spec: ExperimentSpec, recs: list[dict]) -> list[dict]:
    """The records' fields the columns read (and step, training seconds), for the JSON."""
    keys = {"step", "perf/train_seconds"} | {c.partition(":")[2].partition(">=")[0] for _, c in spec.columns}
    return [{k: r[k] for k in keys if k in r} for r in recs]


def _records_and_summary(entry: dict) -> tuple[list[dict], dict]:
    """A JSON entry's run: its kept records, or (JSON written before records were kept) its run dir's."""
    if "records" in entry:
        return entry["records"], entry["summary"]
    return read_run(Path(entry["run_dir"]))


def run_experiment(spec_path: str, out_md: str | None, only: list[str] | None = None,
                   variant_timeout_s: float = 3600.0) -> str:
    """Run every variant (or those named in ``only``) once per seed, write ``out_md`` and its ``.json``;
    returns the Markdown.

    With ``only``, the other variants' rows are rebuilt from the records kept in the existing ``.json``
    next to ``out_md`` (so one variant can be rerun without rerunning the rest).

    Raises:
        ValueError: bad spec or an unknown name in ``only``.
        RuntimeError, TimeoutError: a variant failed.
    """
    spec = load_spec(spec_path)
    names = [v.name for v in spec.variants]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the spec has {names}")
    stamp = Path("runs") / "experiments" / f"{Path(spec_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_root, n = stamp, 1
    while out_root.exists():  # a second call within the same second
        n += 1
        out_root = stamp.with_name(f"{stamp.name}-{n}")
    out_root.mkdir(parents=True)
    raw_path = Path(out_md).with_suffix(".json") if out_md else None
    # with --only, rows of the other variants come from the earlier runs recorded next to the table
    raw = json.loads(raw_path.read_text()) if only and raw_path and raw_path.is_file() else {}
    for label, v, extra in spec.runs():
        if only and v.name not in only:
            continue
        run_dir = run_variant(spec, v, out_root, variant_timeout_s, label, extra)
        recs, summary = read_run(run_dir)
        raw[label] = {"run_dir": str(run_dir), "overrides": [*v.overrides, *extra], "summary": summary,
                      "records": _kept_records(spec, recs), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        logger.info("run %r done: %s", label, run_dir)
    runs = {label: _records_and_summary(raw[label]) for label, _, _ in spec.runs() if label in raw}
    rows = [(label, [column_value(c, *run) for _, c in spec.columns]) for label, run in runs.items()]
    for label, vals in rows:
        logger.info("%s: %s", label, dict(zip([h for h, _ in spec.columns], vals)))
    seed_rows = []
    if spec.seeds:
        for v in spec.variants:
            mine = [runs[label] for label, w, _ in spec.runs() if w is v and label in runs]
            if mine:
                seed_rows.append((v.name, [across_seeds(c, mine) for _, c in spec.columns]))
    command = f"relayrl experiment {spec_path}" + (f" --out {out_md}" if out_md else "")
    md = render(spec, rows, command, rerun=list(only or []), seed_rows=seed_rows)
    if out_md:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(out_md).write_text(md)
        Path(out_md).with_suffix(".json").write_text(json.dumps(raw, indent=2))
    return md
