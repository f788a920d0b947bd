"""The arithmetic and the table of `relayrl bench` (tooling.bench_math)."""

from __future__ import annotations

import math

import pytest

from tooling.bench_math import (ideal_speedup, learner_busy_frac, overhead_pct, overlap_efficiency,
                                     paired_overhead_pct, rate, render, row, run_throughput, table, to_json)


def test_overhead_is_extra_seconds_per_token():
    # raw 100 tokens/s, wrapped 80 tokens/s: 0.0125 s vs 0.01 s per token, 25% more
    assert overhead_pct(100.0, 80.0) == pytest.approx(25.0)
    assert overhead_pct(100.0, 100.0) == 0.0
    assert overhead_pct(100.0, 125.0) == pytest.approx(-20.0)


def test_paired_overhead_is_the_median_and_ignores_one_slow_call():
    raw = [(100, 1.0), (100, 1.0), (100, 5.0)]  # the third raw call hit a busy moment
    wrapped = [(100, 1.02), (100, 1.04), (100, 1.0)]
    assert paired_overhead_pct(raw, wrapped) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="2 raw and 1 wrapped"):
        paired_overhead_pct(raw[:2], wrapped[:1])


def test_ideal_speedup_and_overlap_efficiency():
    assert ideal_speedup(10.0, 10.0) == pytest.approx(2.0)  # equal stages: overlap halves the time
    assert ideal_speedup(10.0, 5.0) == pytest.approx(1.5)  # 0.1 + 0.2 s vs 0.2 s per sample
    assert ideal_speedup(1.0, 1000.0) == pytest.approx(1.001)
    assert overlap_efficiency(4.5, 10.0, 5.0) == pytest.approx(0.9)


def test_rate_rejects_a_non_positive_duration():
    assert rate(10.0, 2.0) == 5.0
    with pytest.raises(ValueError, match="got 0.0 s"):
        rate(10.0, 0.0)


def test_run_throughput_skips_step_one():
    recs = [{"step": 0, "eval/accuracy": 0.1}, {"step": 1, "perf/step_seconds": 100.0},
            {"step": 2, "perf/step_seconds": 2.0}, {"step": 3, "perf/step_seconds": 6.0}]
    assert run_throughput(recs, 32) == pytest.approx(32 / 4.0)
    with pytest.raises(ValueError, match="at least 2 steps"):
        run_throughput(recs[:2], 32)


def test_rows_check_targets():
    assert row(4.0, "%", ("<=", 5.0))["met"] is True
    assert row(6.0, "%", ("<=", 5.0)) == {"value": 6.0, "unit": "%", "target": "<= 5", "met": False}
    assert row(0.95, "", (">=", 0.9))["met"] is True
    assert row(math.nan, "", (">=", 0.9))["met"] is False
    assert row(3.0, "s")["met"] is None
    with pytest.raises(ValueError, match="'<'"):
        row(1.0, "", ("<", 2.0))


def test_table_markdown_and_json():
    results = {"wrapper": {"raw vLLM": row(812.3456, "tokens/s"), "overhead": row(7.5, "%", ("<=", 5.0))},
               "weight_push": {"push bandwidth": row(0.147, "GB/s")}}
    lines = table(results)
    assert lines[0] == "| benchmark | metric | value | target | met? |"
    assert "| wrapper | raw vLLM | 812 tokens/s |  |  |" in lines
    assert "| wrapper | overhead | 7.5 % | <= 5 | **no** |" in lines
    md = render(results, "relayrl bench c.toml --only wrapper", "c.toml", ["a note"])
    assert "`relayrl bench c.toml --only wrapper`" in md and md.rstrip().endswith("a note")
    js = to_json(results, "relayrl bench c.toml", "c.toml", ["a note"], {"wrapper": {}})
    assert [r["metric"] for r in js["rows"]] == ["raw vLLM", "overhead", "push bandwidth"]
    assert js["rows"][1] == {"benchmark": "wrapper", "metric": "overhead", "value": 7.5, "unit": "%",
                             "target": "<= 5", "met": False}
    assert js["command"] == "relayrl bench c.toml"


def test_learner_busy_fraction_skips_step_one():
    recs = [{"step": 1, "perf/step_seconds": 50.0, "learner/seconds": 1.0},
            {"step": 2, "perf/step_seconds": 4.0, "learner/seconds": 1.0},
            {"step": 3, "perf/step_seconds": 4.0, "learner/seconds": 3.0}]
    assert learner_busy_frac(recs) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="at least 2 steps"):
        learner_busy_frac(recs[:1])
