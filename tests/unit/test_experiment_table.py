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


def test_only_reruns_one_row_and_rebuilds_the_others_from_the_recorded_json(tmp_path, monkeypatch):
    """``--only``: the named variant runs again, the other rows come from the records kept in the ``.json``
    (the real subprocess runs are covered by tests/integration/test_experiment.py)."""
    import json

    import tooling.experiment as experiment

    spec = tmp_path / "spec.toml"
    spec.write_text('title = "t"\nconfig = "c.toml"\ncolumns = [["acc", "curve:eval/accuracy"]]\n'
                    '[[variants]]\nname = "a"\n[[variants]]\nname = "b"\n')
    calls: list[str] = []

    def fake_run(spec_, v, out_root, timeout_s, label, extra):  # a finished run dir, as `relayrl train` leaves
        calls.append(label)
        d = out_root / f"{label}-{len(calls)}"
        d.mkdir(parents=True)
        acc = 0.1 * len(calls)
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "eval/accuracy": acc + s}) + "\n"
                                                 for s in (0, 1)))
        (d / "summary.json").write_text(json.dumps({"step": 1}))
        return d

    monkeypatch.setattr(experiment, "run_variant", fake_run)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "docs" / "table.md"
    md = experiment.run_experiment(str(spec), str(out))
    assert calls == ["a", "b"] and "| a | 0.100@0, 1.100@1 |" in md and "| b | 0.200@0, 1.200@1 |" in md
    raw = json.loads(out.with_suffix(".json").read_text())
    md2 = experiment.run_experiment(str(spec), str(out), only=["a"])
    assert calls == ["a", "b", "a"]  # only the named variant ran again
    assert "| a | 0.300@0, 1.300@1 |" in md2 and "| b | 0.200@0, 1.200@1 |" in md2  # b rebuilt from the json
    assert "rerun afterwards with `--only`" in md2 and "`a`" in md2 and out.read_text() == md2
    raw2 = json.loads(out.with_suffix(".json").read_text())
    assert raw2["b"] == raw["b"] and raw2["a"]["run_dir"] != raw["a"]["run_dir"]
