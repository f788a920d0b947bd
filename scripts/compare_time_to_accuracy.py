"""Time for each relayrl variant to reach the TRL baseline's best held-out accuracy, seed by seed, from the JSON
that `relayrl experiment deploy/experiments/time_to_accuracy.toml --out docs/time_to_accuracy.md` writes.

For seed s: b = the best held-out accuracy of the TRL run (evals after step 0), t_TRL = the training seconds at
TRL's first eval reaching b, and for a relayrl variant t = the training seconds at its first eval reaching b
(None if it never did). The ratio t / t_TRL is the issue's "async reaches TRL's best held-out accuracy in at most
0.4x TRL's wall clock". Also: the per-step speed ratio (mean ``perf/step_seconds`` is not kept in the JSON, so
training seconds over steps from each run's summary), and the two runs' held-out accuracy at every step where
both evaluated (``same_steps``: learning per step, whatever the step rate).

    .venv/bin/python scripts/compare_time_to_accuracy.py docs/time_to_accuracy.json [--baseline "TRL 1.16"]

Exits non-zero with a one-line error when the JSON has no run of the baseline.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path


def first_reaching(records: list[dict], threshold: float) -> dict | None:
    """The first record after step 0 whose held-out accuracy is >= ``threshold``, or None."""
    return next((r for r in records if r.get("step", 0) > 0 and r.get("eval/accuracy") is not None
                 and r["eval/accuracy"] >= threshold - 1e-12), None)


def accuracy_by_step(records: list[dict]) -> dict[int, float]:
    """Held-out accuracy of each eval after step 0, by step."""
    return {r["step"]: r["eval/accuracy"] for r in records if r.get("step", 0) > 0 and r.get("eval/accuracy") is not None}


def best(records: list[dict]) -> float | None:
    """Best held-out accuracy after step 0, or None when no eval ran after it."""
    return max(accuracy_by_step(records).values(), default=None)


def compare(raw: dict, baseline: str) -> dict:
    """``{variant: [{seed, trl_best, trl_seconds, seconds, ratio, step_seconds, trl_step_seconds, best,
    same_steps}, ...]}`` for every non-baseline variant; ``same_steps``: ``{step: [accuracy, TRL's accuracy]}``
    at the steps both runs evaluated.

    Raises:
        ValueError: no run label starts with ``baseline``.
    """
    by_variant: dict[str, dict[str, dict]] = {}
    for label, entry in raw.items():
        m = re.match(r"(.*), seed (\d+)$", label)
        name, seed = (m.group(1), m.group(2)) if m else (label, "-")
        by_variant.setdefault(name, {})[seed] = entry
    base = next((v for k, v in by_variant.items() if k.startswith(baseline)), None)
    if base is None:
        raise ValueError(f"no run of the baseline {baseline!r} in the JSON (variants: {sorted(by_variant)})")
    out: dict[str, list[dict]] = {}
    for name, runs in by_variant.items():
        if name.startswith(baseline):
            continue
        rows = []
        for seed, entry in sorted(runs.items()):
            if seed not in base:
                continue
            b = best(base[seed]["records"])
            hit_trl = first_reaching(base[seed]["records"], b) if b is not None else None
            hit = first_reaching(entry["records"], b) if b is not None else None
            t_trl = hit_trl["perf/train_seconds"] if hit_trl else None
            t = hit["perf/train_seconds"] if hit else None
            s, sb = entry["summary"], base[seed]["summary"]
            trl = accuracy_by_step(base[seed]["records"])
            rows.append({"seed": seed, "trl_best": b, "trl_seconds": t_trl, "seconds": t,
                         "ratio": (t / t_trl) if (t is not None and t_trl) else None,
                         "step_seconds": s["perf/train_seconds"] / s["step"],
                         "trl_step_seconds": sb["perf/train_seconds"] / sb["step"],
                         "best": best(entry["records"]),
                         "same_steps": {str(k): [a, trl[k]] for k, a in accuracy_by_step(entry["records"]).items()
                                        if k in trl}})
        out[name] = rows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--baseline", default="TRL", help="label prefix of the baseline variant")
    args = ap.parse_args()
    try:
        result = compare(json.loads(args.json.read_text()), args.baseline)
    except (OSError, ValueError, KeyError) as e:
        print(f"compare_time_to_accuracy: {e}", file=sys.stderr)
        return 2
    for name, rows in result.items():
        for r in rows:
            reached = (f"{r['seconds']:.0f} s, {r['ratio']:.2f}x TRL's {r['trl_seconds']:.0f} s"
                       if r["ratio"] is not None else "not reached")
            print(f"{name}, seed {r['seed']}: TRL best {r['trl_best']:.3f}; reached {reached}; own best "
                  f"{r['best']:.3f}; {r['step_seconds']:.1f} s/step vs TRL {r['trl_step_seconds']:.1f} s/step; "
                  "at the same steps (step: own, TRL): "
                  + (", ".join(f"{k}: {a:.3f}, {t:.3f}" for k, (a, t) in r["same_steps"].items()) or "none"))
        ratios = [r["ratio"] for r in rows if r["ratio"] is not None]
        if ratios:
            print(f"{name}: mean ratio {statistics.fmean(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), "
                  f"{len(ratios)} of {len(rows)} seeds reached TRL's best")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
