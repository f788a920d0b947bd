"""The rows `relayrl bench` adds for issues 32 and 33 (tooling.bench_generation, the ``overlap`` learner-wait row,
tooling.bench_delta's rows), built from stand-in measurements: no Ray, no engine."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from tooling import bench, bench_generation
from tooling.bench_delta import delta_rows
from tooling.bench_generation import EVAL_REPEATS, engine_threads, generation_rows
from tooling.bench_math import spread_row, step_values, table, to_json

CALLS = {"raw": [(800, 4.0), (900, 5.0), (700, 3.5)], "relayrl": [(800, 4.4), (900, 5.0), (700, 3.5)]}


def _well_formed(rows: dict) -> None:
    """Every row names a unit (or is a pure ratio), has a finite value, and a repeated one its spread."""
    for metric, r in rows.items():
        assert math.isfinite(r["value"]), metric
        assert isinstance(r["unit"], str) and (r["unit"] or "/" in metric or "ratio" in metric), metric
        if "n" in r:
            assert r["min"] <= r["median"] == r["value"] <= r["max"], metric


def test_spread_row_is_the_median_with_min_max_and_checks_the_target_on_the_median():
    r = spread_row([3.0, 1.0, 2.0, 10.0], "s", ("<=", 2.6))
    assert r == {"value": 2.5, "unit": "s", "target": "<= 2.6", "met": True, "min": 1.0, "median": 2.5,
                 "max": 10.0, "n": 4}
    assert "| b | m | 2.5 s (min 1, max 10, n=4) | <= 2.6 | yes |" in table({"b": {"m": r}})
    assert "| b | one | 7 s |  |  |" in table({"b": {"one": spread_row([7.0], "s")}})  # n = 1: no spread
    with pytest.raises(ValueError, match="at least one value"):
        spread_row([], "s")


def test_step_values_skip_step_one_and_follow_step_order():
    recs = [{"step": 3, "perf/learner_wait_frac": 0.3}, {"step": 1, "perf/learner_wait_frac": 0.9},
            {"step": 0, "eval/accuracy": 0.5}, {"step": 2, "perf/learner_wait_frac": 0.1}]
    assert step_values(recs, "perf/learner_wait_frac") == [0.1, 0.3]
    with pytest.raises(ValueError, match="'perf/learner_wait_frac'"):
        step_values(recs[1:3], "perf/learner_wait_frac")


def test_generation_rows_per_core_side_by_side_and_eval_seconds():
    correct = [[True, False, True, True]] * 2 + [[True, False, False, True]]
    rows = generation_rows(CALLS, 2, [14.0, 12.0, 16.0], correct)
    _well_formed(rows)
    raw, ours = rows["raw vLLM: tokens/s per core"], rows["relayrl RolloutWorker: tokens/s per core"]
    assert (raw["unit"], raw["n"]) == ("tokens/s/core", 3)
    assert raw["value"] == pytest.approx(100.0) and raw["min"] == pytest.approx(90.0)  # 800 / 4 s / 2 threads
    assert ours["value"] == pytest.approx(800 / 4.4 / 2) and ours["min"] == pytest.approx(90.0)
    ratio = rows["RolloutWorker / raw vLLM (tokens/s, paired calls)"]
    assert ratio["median"] == pytest.approx(1.0) and ratio["min"] == pytest.approx(4.0 / 4.4)
    assert ratio["target"] == ">= 0.9" and ratio["met"] is True
    ev = rows["held-out eval, 4 problems"]
    assert (ev["value"], ev["min"], ev["max"], ev["unit"], ev["target"], ev["met"]) == (14.0, 12.0, 16.0, "s",
                                                                                       "<= 15", True)
    acc = rows["held-out eval: accuracy (base policy)"]
    assert (acc["value"], acc["min"], acc["max"]) == (0.75, 0.5, 0.75)
    assert rows["engine threads per worker"]["value"] == 2
    assert generation_rows(CALLS, 2, [20.0], [[True]])["held-out eval, 1 problems"]["met"] is False


def test_generation_rows_refuse_unpaired_calls_and_bad_evals():
    with pytest.raises(ValueError, match="3 raw and 2 relayrl"):
        generation_rows({"raw": CALLS["raw"], "relayrl": CALLS["relayrl"][:2]}, 1, [1.0], [[True]])
    with pytest.raises(ValueError, match="threads = 0"):
        generation_rows(CALLS, 0, [1.0], [[True]])
    with pytest.raises(ValueError, match="result lists of \\[1, 2\\] problems"):
        generation_rows(CALLS, 1, [1.0, 1.0], [[True], [True, False]])
    assert engine_threads(0.5) == 1 and engine_threads(2.0) == 2


class _Rollout:
    """Stand-in `RolloutGroup`: records the evaluate calls."""

    def __init__(self) -> None:
        self.calls = []

    def evaluate(self, problems, min_version, max_tokens, timeout_s):
        self.calls.append((len(problems), min_version, max_tokens, timeout_s))
        return [i % 2 == 0 for i in range(len(problems))]

    def evaluate_pass_k(self, problems, pass_problems, k, min_version, max_tokens, timeout_s):
        self.calls.append(("pass@k", len(problems), pass_problems, k, min_version))
        return [True] * len(problems), [k if i % 4 == 0 else 0 for i in range(pass_problems)]


class _Session:
    """Stand-in `tooling.bench_session.Session`: the config, measured values and a stand-in rig."""

    def __init__(self, cfg, measured=None, raw=None) -> None:
        self.cfg, self.config_path, self.measured, self.raw = cfg, "main.toml", dict(measured or {}), dict(raw or {})
        self.rollout, self.pushed_version, self.released = _Rollout(), 0, 0

    def once(self, key, measure):
        if key not in self.measured:
            self.measured[key] = measure()
        return self.measured[key]

    def release(self):
        self.released += 1

    def gen_rate(self):
        raise AssertionError("G is measured already")

    def train_step_seconds(self):
        raise AssertionError("T is measured already")

    def rig(self):
        return None, self.rollout, None


def _main_job_cfg():
    from orchestrator.config import load_config

    return load_config("deploy/examples/arithmetic_smollm2.toml")


def test_bench_generation_evaluates_after_a_push_as_the_run_does(monkeypatch):
    cfg = _main_job_cfg()
    s = _Session(cfg, raw={"wrapper": {"calls_tokens_seconds": CALLS}})  # the wrapper's calls, already measured

    def push(sess, extra=(), repeats=3):
        assert repeats == 1
        sess.pushed_version += 1
        return [{}]

    monkeypatch.setattr(bench_generation, "pushes", push)
    rows = bench_generation.bench_generation(s)
    _well_formed(rows)
    rc = cfg.rollout
    # every eval waits for the push just made, with Trainer.evaluate's token budget and timeout
    assert s.rollout.calls == [(cfg.data.eval_size, v, cfg.eval_max_tokens or rc.max_tokens,
                                rc.request_timeout_s + rc.weight_wait_timeout_s) for v in range(1, EVAL_REPEATS + 1)]
    assert s.released == 1  # a fresh rig: the base policy
    ev = rows[f"held-out eval, {cfg.data.eval_size} problems"]
    assert ev["n"] == EVAL_REPEATS and ev["unit"] == "s" and ev["target"] == "<= 15" and ev["min"] >= 0
    assert rows["held-out eval: accuracy (base policy)"]["value"] == 0.5
    assert s.raw["generation"]["eval_correct"] == [cfg.data.eval_size // 2] * EVAL_REPEATS
    js = to_json({"generation": rows}, "relayrl bench main.toml", "main.toml", [], s.raw)
    assert {r["metric"] for r in js["rows"]} == set(rows)


def test_bench_generation_times_the_eval_with_pass_k_when_it_is_on(monkeypatch):
    cfg = _main_job_cfg().model_copy(update={"eval_pass_k_problems": 8})
    s = _Session(cfg, raw={"wrapper": {"calls_tokens_seconds": CALLS}})

    def push(sess, extra=(), repeats=3):
        sess.pushed_version += 1
        return [{}]

    monkeypatch.setattr(bench_generation, "pushes", push)
    rows = bench_generation.bench_generation(s)
    _well_formed(rows)
    k = cfg.rollout.group_size
    # after the greedy evals, as many with pass@k, each after its own push
    assert s.rollout.calls[EVAL_REPEATS:] == [("pass@k", cfg.data.eval_size, 8, k, v)
                                              for v in range(EVAL_REPEATS + 1, 2 * EVAL_REPEATS + 1)]
    assert rows[f"held-out eval + pass@{k} on 8 of the problems"]["n"] == EVAL_REPEATS
    assert rows[f"held-out pass@{k} (base policy)"]["value"] == 0.25  # 2 of 8 problems solved by all k samples


def test_bench_generation_refuses_a_config_without_held_out_problems():
    cfg = _main_job_cfg()
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"eval_size": 0})})
    with pytest.raises(ValueError, match="data.eval_size = 0"):
        bench_generation.bench_generation(_Session(cfg, raw={"wrapper": {"calls_tokens_seconds": CALLS}}))


def test_overlap_rows_include_the_async_runs_learner_wait_per_step():
    cfg = SimpleNamespace(samples_per_step=64)
    s = _Session(cfg, measured={"generate_samples_per_s": 8.0, "train_step_seconds": 16.0,
                                "async_samples_per_s": 3.6},
                 raw={"runs": {"async": {"learner_wait_frac": [0.3, 0.05, 0.1, 0.2]}}})
    rows = bench.bench_overlap(s)
    _well_formed(rows)
    assert rows["overlap efficiency A/min(G,T)"]["value"] == pytest.approx(3.6 / 4.0)
    wait = rows["learner wait, async run (per step)"]
    assert (wait["unit"], wait["n"], wait["target"], wait["met"]) == ("% of step", 4, "<= 10", False)
    assert (wait["min"], wait["value"], wait["max"]) == pytest.approx((5.0, 15.0, 30.0))


def test_delta_rows_spread_over_the_repeated_pushes():
    full = [{"bytes": 269e6, "push_s": s} for s in (2.0, 1.8, 2.4)]
    done = [{"kind": "full", "bytes": 269.1e6, "push_s": 7.0, "encode_s": 3.0, "changed_frac": 1.0},
            *({"kind": "delta", "bytes": b, "push_s": p, "encode_s": e, "changed_frac": c}
              for b, p, e, c in ((14e6, 4.0, 1.2, 0.034), (18e6, 4.2, 1.5, 0.05), (16e6, 3.9, 1.4, 0.04)))]
    rows = delta_rows(full, done)
    _well_formed(rows)
    assert rows["full, object store: push"]["value"] == 2.0 and rows["full, object store: push"]["n"] == 3
    assert rows["full, delta transport: push"] == {"value": 7.0, "unit": "s", "target": "", "met": None}
    d = rows["delta: MB per worker"]
    assert (d["min"], d["value"], d["max"]) == pytest.approx((14.0, 16.0, 18.0)) and d["unit"] == "MB"
    assert rows["delta / full bytes"]["value"] == pytest.approx(100 * 16 / 269)
    assert rows["delta: changed elements"]["max"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="kinds \\['full', 'full'\\]"):
        delta_rows(full, [done[0], done[0]])
