"""`relayrl experiment` tables across seeds: runs per seed, mean (min-max), reach counts, mean curves."""

from __future__ import annotations

from tooling.experiment import ExperimentSpec, across_seeds, column_number, render

SPEC = ExperimentSpec.model_validate({
    "title": "t", "config": "c.toml", "seeds": [1, 2],
    "columns": [["steps", "summary:step"], ["reach", "reach:eval/accuracy>=0.5"], ["acc", "curve:eval/accuracy"]],
    "variants": [{"name": "async", "overrides": ["buffer.max_staleness=1"]}, {"name": "sync"}]})


def _run(accs: list[float], seconds_per_step: float) -> tuple[list[dict], dict]:
    recs = [{"step": i, "eval/accuracy": a, "perf/train_seconds": i * seconds_per_step} for i, a in enumerate(accs)]
    return recs, {"step": len(accs) - 1}


def test_every_variant_runs_once_per_seed_with_the_seed_override():
    runs = SPEC.runs()
    assert [(label, extra) for label, _, extra in runs] == [
        ("async, seed 1", ["seed=1"]), ("async, seed 2", ["seed=2"]),
        ("sync, seed 1", ["seed=1"]), ("sync, seed 2", ["seed=2"])]
    one = SPEC.model_copy(update={"seeds": []})
    assert [(label, extra) for label, _, extra in one.runs()] == [("async", []), ("sync", [])]


def test_across_seeds_means_reach_counts_and_curves():
    a, b, never = _run([0.4, 0.5, 0.6], 10.0), _run([0.4, 0.45, 0.55], 20.0), _run([0.4, 0.42, 0.44], 5.0)
    assert column_number("reach:eval/accuracy>=0.5", *a) == 10.0 and column_number("reach:eval/accuracy>=0.5", *never) is None
    assert across_seeds("reach:eval/accuracy>=0.5", [a, b, never]) == "25 s (10-40), 2 of 3 reached"
    assert across_seeds("reach:eval/accuracy>=0.5", [never]) == "not reached (0 of 1)"
    assert across_seeds("summary:step", [a, b]) == "2 (2-2)"
    assert across_seeds("curve:eval/accuracy", [a, b]) == "0.400@0, 0.475@1, 0.575@2"


def test_render_puts_the_across_seeds_table_first():
    md = render(SPEC, [("async, seed 1", ["2", "10 s @ step 1", "-"])], "relayrl experiment s.toml",
                seed_rows=[("async", ["2 (2-2)", "25 s (10-40), 2 of 3 reached", "-"])])
    assert "seeds 1, 2" in md and md.index("Across seeds") < md.index("Each run:") < md.index("| async, seed 1 |")
