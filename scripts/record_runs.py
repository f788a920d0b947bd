"""Record finished runs as one JSON artifact for the docs: each run's summary, its held-out evals and
per-step timings, the config it ran, and the command and commit that produced it.

    .venv/bin/python scripts/record_runs.py RUN_DIR [RUN_DIR ...] --command "make train" \
        --commit 8b749b6 --out docs/main_job.json

Raises (exits non-zero with) a one-line error when a run dir has no ``summary.json`` (unfinished run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STEP_KEYS = ("step", "perf/train_seconds", "perf/step_seconds", "learner/seconds", "rollout/reward_mean",
             "learner/entropy", "learner/zero_variance_group_frac")


def record(run_dir: Path) -> dict:
    """One run's record: summary, eval rows (every ``eval/*`` key, step and training seconds), step rows.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``summary.json``.
    """
    if not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"run dir {run_dir} has no summary.json: record finished runs only")
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [{k: v for k, v in r.items() if k.startswith("eval/") or k in ("step", "perf/train_seconds")}
             for r in recs if r.get("eval/accuracy") is not None]
    steps = [{k: r[k] for k in STEP_KEYS if k in r} for r in recs if r.get("step", 0) > 0]
    return {"run_dir": str(run_dir), "summary": json.loads((run_dir / "summary.json").read_text()),
            "evals": evals, "steps": steps, "config": json.loads((run_dir / "config.json").read_text())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--command", required=True, help="the command that produced the runs")
    ap.add_argument("--commit", required=True, help="the commit the runs ran")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    try:
        runs = [record(r) for r in args.runs]
    except FileNotFoundError as e:
        print(f"record_runs: {e}", file=sys.stderr)
        return 2
    args.out.write_text(json.dumps({"command": args.command, "commit": args.commit,
                                    "recorded": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs}, indent=1))
    print(f"wrote {args.out}: {len(runs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
