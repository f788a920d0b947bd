"""Record a finished run of this example as the JSON the docs cite: held-out accuracy before and after (from the
run's own ``metrics.jsonl`` / ``summary.json``), each reward function's mean per step, steps, wall time, the
command, the commit and the machine.

    .venv/bin/python examples/word_problems/record_run.py RUN_DIR \
        --command "relayrl train examples/word_problems/config.toml" --out docs/example_word_problems.json \
        [--probe "PROBE COMMAND" PROBE_OUTPUT ...]

``--probe`` adds what ``scripts/probe_task.py`` printed (its JSON line, saved to PROBE_OUTPUT) before the run.

Exits non-zero with a one-line error when ``RUN_DIR`` has no ``summary.json`` (an unfinished run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

STEP_KEYS = ("step", "perf/train_seconds", "perf/step_seconds", "learner/seconds", "rollout/reward_mean", "rollout/correct_frac",
             "rollout/reward_failed_frac", "learner/zero_variance_group_frac", "rollout/response_len_mean")


def machine() -> dict:
    """The CPU model, the cores this process may use, memory and the OS, read from this machine."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {"cpu": model or platform.processor(), "cores": len(os.sched_getaffinity(0)),
            "memory_gib": round(mem / 2**30, 1), "gpu": None, "os": platform.platform(),
            "python": platform.python_version()}


def commit() -> str:
    """``git rev-parse --short HEAD`` of the working tree, with ``+dirty`` when it has uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=30).stdout.strip()

    head = git("rev-parse", "--short", "HEAD")
    return head + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def record(run_dir: Path) -> dict:
    """The run's record: held-out evals, per-step rows (every ``rollout/reward/*`` and ``rollout/reward_failures/*``
    key beside `STEP_KEYS`) and the figures the docs quote.

    Raises:
        FileNotFoundError: ``run_dir`` has no ``summary.json``.
    """
    if not (run_dir / "summary.json").is_file():
        raise FileNotFoundError(f"run dir {run_dir} has no summary.json: record finished runs only")
    summary = json.loads((run_dir / "summary.json").read_text())
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    evals = [{k: v for k, v in r.items() if k.startswith("eval/") or k in ("step", "perf/train_seconds")}
             for r in recs if r.get("eval/accuracy") is not None]
    steps = [{k: v for k, v in r.items() if k in STEP_KEYS or k.startswith(("rollout/reward/",
                                                                               "rollout/reward_failures/"))}
             for r in recs if r.get("step", 0) > 0]
    config = json.loads((run_dir / "config.json").read_text())
    first, last = evals[0], evals[-1]
    return {
        "held_out": {"problems": config["data"]["eval_size"], "metric": "eval/accuracy: greedy, strict exact match "
                     "of the last 'Answer:' line against the answer column",
                     "before": first["eval/accuracy"], "after": last["eval/accuracy"],
                     "gain": last.get("eval/gain"), "gain_se": last.get("eval/gain_se")},
        "steps": summary["step"], "samples_per_step": config["prompts_per_step"] * config["rollout"]["group_size"],
        "train_seconds": round(summary["perf/train_seconds"], 1), "wall_seconds": round(summary["time/elapsed_s"], 1),
        "run_dir": str(run_dir), "evals": evals, "per_step": steps, "summary": summary, "config": config,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--command", required=True, help="the command that produced the run")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--probe", nargs=2, action="append", default=[], metavar=("COMMAND", "OUTPUT"),
                    help="a probe_task.py command and the file holding the JSON line it printed")
    args = ap.parse_args()
    try:
        rec = record(args.run)
    except FileNotFoundError as e:
        print(f"record_run: {e}", file=sys.stderr)
        return 2
    probes = [{"command": cmd, "result": json.loads(Path(path).read_text().strip().splitlines()[-1])}
              for cmd, path in args.probe]
    out = {"command": args.command, "commit": commit(), "recorded": time.strftime("%Y-%m-%d %H:%M:%S"),
           "machine": machine(), "probes": probes, **rec}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    h = rec["held_out"]
    print(f"wrote {args.out}: held-out {h['before']:.3f} -> {h['after']:.3f} in {rec['steps']} steps, "
          f"{rec['train_seconds']:.0f} s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
