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
same config (``relayrl trl-baseline``, `orchestrator.tools.trl_baseline`).

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
    notes: str = Field("", description="text printed under the table")


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


def _reach(spec: str, key: str, recs: list[dict]) -> str:
    """``reach:<key>>=<x>``: ``"<s> s @ step N"`` at the first record with ``key >= x``, else
    ``"not reached (<s> s, N steps)"`` with the run's last training seconds and step."""
    name, _, x = key.partition(">=")
    try:
        threshold = float(x)
    except ValueError:
        threshold = None
    if not name or threshold is None:
        raise ValueError(f"column spec {spec!r}: expected reach:<key>>=<number>")
    for r in recs:
        if r.get(name) is not None and r[name] >= threshold:
            return f"{r.get('perf/train_seconds', 0.0):.0f} s @ step {r['step']}"
    last = max(recs, key=lambda r: r.get("step", 0)) if recs else {}
    return f"not reached ({last.get('perf/train_seconds', 0.0):.0f} s, {last.get('step', 0)} steps)"


def run_variant(spec: ExperimentSpec, variant: Variant, out_root: Path, timeout_s: float) -> Path:
    """Train one variant in a subprocess; returns its run dir.

    Raises:
        RuntimeError: the run failed (exit code and the tail of its log in the message).
        TimeoutError: it ran past ``timeout_s``.
    """
    slug = "".join(c if c.isalnum() else "-" for c in variant.name.lower()).strip("-")
    out = out_root / slug
    command = ["train", "-q"] if variant.runner == "relayrl" else ["trl-baseline"]
    cmd = [sys.executable, "-m", "orchestrator.cli", *command, spec.config, *spec.overrides, *variant.overrides,
           f"name={slug}", f"output_dir={out}"]
    logger.info("variant %r: %s", variant.name, " ".join(cmd[2:]))
    log = out_root / f"{slug}.log"
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"variant {variant.name!r} ran past {timeout_s:.0f} s; log: {log}") from None
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise RuntimeError(f"variant {variant.name!r} exited {rc}; log {log}:\n{tail}")
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return run_dir


def render(spec: ExperimentSpec, rows: list[tuple[str, list[str]]], command: str, rerun: list[str] = ()) -> str:
    """Markdown: heading, how to reproduce, the table, notes (and which rows a later ``--only`` rerun)."""
    head = ["variant", *(h for h, _ in spec.columns)]
    lines = [f"## {spec.title}", "", f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} "
             f"({os.cpu_count()} CPUs). Base config `{spec.config}`, shared overrides "
             f"`{' '.join(spec.overrides) or '-'}`.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([name, *vals]) + " |" for name, vals in rows]
    if rerun:
        lines += ["", "Rows rerun afterwards with `--only` (the others kept from the earlier run): "
                  + ", ".join(f"`{n}`" for n in rerun) + "."]
    if spec.notes:
        lines += ["", spec.notes.strip()]
    return "\n".join(lines) + "\n"


def run_experiment(spec_path: str, out_md: str | None, only: list[str] | None = None,
                   variant_timeout_s: float = 3600.0) -> str:
    """Run every variant (or those named in ``only``), write ``out_md`` and its ``.json``; returns the Markdown.

    With ``only``, the other variants' rows are rebuilt from the run dirs recorded in the existing
    ``.json`` next to ``out_md`` (so one row can be rerun without rerunning the rest).

    Raises:
        ValueError: bad spec or an unknown name in ``only``.
        RuntimeError, TimeoutError: a variant failed.
    """
    spec = load_spec(spec_path)
    names = [v.name for v in spec.variants]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; the spec has {names}")
    out_root = Path("runs") / "experiments" / f"{Path(spec_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_root.mkdir(parents=True)
    raw_path = Path(out_md).with_suffix(".json") if out_md else None
    # with --only, rows of the other variants come from the earlier runs recorded next to the table
    raw = json.loads(raw_path.read_text()) if only and raw_path and raw_path.is_file() else {}
    for v in spec.variants:
        if only and v.name not in only:
            continue
        run_dir = run_variant(spec, v, out_root, variant_timeout_s)
        raw[v.name] = {"run_dir": str(run_dir), "overrides": v.overrides, "summary": read_run(run_dir)[1],
                       "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        logger.info("variant %r done: %s", v.name, run_dir)
    rows = []
    for v in spec.variants:
        if v.name in raw:
            recs, summary = read_run(Path(raw[v.name]["run_dir"]))
            rows.append((v.name, [column_value(c, recs, summary) for _, c in spec.columns]))
            logger.info("%s: %s", v.name, dict(zip([h for h, _ in spec.columns], rows[-1][1])))
    command = f"relayrl experiment {spec_path}" + (f" --out {out_md}" if out_md else "")
    md = render(spec, rows, command, rerun=list(only or []))
    if out_md:
        Path(out_md).parent.mkdir(parents=True, exist_ok=True)
        Path(out_md).write_text(md)
        Path(out_md).with_suffix(".json").write_text(json.dumps(raw, indent=2))
    return md
