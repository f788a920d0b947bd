"""`scripts/compare_time_to_accuracy.py`: each relayrl run's time to the TRL run's best accuracy, seed by seed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location(
    "compare_tta", Path(__file__).resolve().parents[2] / "scripts" / "compare_time_to_accuracy.py")
compare_tta = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_tta)


def _run(accs: list[float], seconds_per_eval: float, steps_per_eval: int = 2) -> dict:
    recs = [{"step": i * steps_per_eval, "perf/train_seconds": i * seconds_per_eval, "eval/accuracy": a}
            for i, a in enumerate(accs)]
    last = recs[-1]
    return {"records": recs, "summary": {"step": last["step"], "perf/train_seconds": last["perf/train_seconds"]}}


def test_time_to_the_baselines_best_seed_by_seed():
    raw = {"async, seed 1": _run([0.45, 0.50, 0.56, 0.60], 50.0), "TRL, seed 1": _run([0.45, 0.55, 0.56], 300.0),
           "async, seed 2": _run([0.45, 0.47, 0.48], 50.0), "TRL, seed 2": _run([0.45, 0.52, 0.51], 300.0)}
    (rows,) = compare_tta.compare(raw, "TRL").values()
    one, two = rows
    assert one["trl_best"] == 0.56 and one["trl_seconds"] == 600.0 and one["seconds"] == 100.0
    assert one["ratio"] == pytest.approx(100 / 600) and one["best"] == 0.60
    assert two["trl_best"] == 0.52 and two["seconds"] is None and two["ratio"] is None  # never reached 0.52
    assert one["step_seconds"] == 25.0 and one["trl_step_seconds"] == 150.0
    # steps 2 and 4 were evaluated by both runs of seed 1 (step 6 by async only); step 0 is left out
    assert one["same_steps"] == {"2": [0.50, 0.55], "4": [0.56, 0.56]}


def test_without_the_baseline_the_error_names_it():
    with pytest.raises(ValueError, match="no run of the baseline 'TRL'"):
        compare_tta.compare({"async, seed 1": _run([0.4, 0.5], 10.0)}, "TRL")
