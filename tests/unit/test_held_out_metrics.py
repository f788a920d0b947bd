"""Held-out accuracy, its standard error and the paired gain over the start eval."""

from __future__ import annotations

import math

import pytest

from orchestrator.metrics import held_out_metrics


def test_start_eval_has_accuracy_and_binomial_standard_error():
    m = held_out_metrics([True] * 50 + [False] * 150, None)
    assert m == {"eval/accuracy": 0.25, "eval/accuracy_se": pytest.approx(math.sqrt(0.25 * 0.75 / 200))}


def test_gain_standard_error_is_the_paired_one():
    # 200 problems: 80 right in both evals, 20 newly right, 4 newly wrong, the rest wrong in both
    start = [True] * 80 + [False] * 20 + [True] * 4 + [False] * 96
    now = [True] * 80 + [True] * 20 + [False] * 4 + [False] * 96
    m = held_out_metrics(now, start)
    d = [1.0] * 20 + [-1.0] * 4 + [0.0] * 176
    mean = sum(d) / 200
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 199 / 200)
    assert m["eval/gain"] == pytest.approx(16 / 200) and m["eval/gain_se"] == pytest.approx(se)
    unpaired = math.hypot(m["eval/accuracy_se"], math.sqrt(0.42 * 0.58 / 200))
    assert m["eval/gain_se"] < unpaired / 2  # agreement on 176 of 200 problems: much tighter than unpaired


def test_evals_of_different_sizes_are_refused_by_name():
    with pytest.raises(ValueError, match="data.eval_size"):
        held_out_metrics([True] * 10, [True] * 12)


def test_a_resumed_logger_starts_from_the_checkpoints_last_record(tmp_path):
    """A run resumed from its checkpoint at the last step trains nothing more; its summary is built from
    the logger's last record, which must be that step's, not empty."""
    from orchestrator.metrics import MetricsLogger

    log = MetricsLogger(tmp_path)
    for step in range(4):
        log.log(step, {"eval/accuracy": step / 10})
    log.flush()
    resumed = MetricsLogger(tmp_path, keep_steps_upto=2)
    assert resumed.last["step"] == 2 and resumed.last["eval/accuracy"] == 0.2
    assert MetricsLogger(tmp_path / "fresh").last == {}


def test_the_gain_line_says_a_paired_gain_in_standard_errors():
    from orchestrator.metrics import gain_line

    assert gain_line(0.58, 0.125, 0.032, 200) == ("held-out accuracy 0.455 -> 0.580: +12.5 points, "
                                                  "3.9 standard errors (paired, 200 problems)")


def test_the_gain_line_of_a_zero_or_undefined_standard_error_has_no_nan():
    from orchestrator.metrics import gain_line

    same = [True] * 97 + [False] * 103
    m = held_out_metrics(same, same)  # no problem changed: gain 0, paired standard error 0
    assert m["eval/gain"] == 0 and m["eval/gain_se"] == 0
    assert gain_line(m["eval/accuracy"], m["eval/gain"], m["eval/gain_se"], 200) == (
        "held-out accuracy 0.485 -> 0.485: +0.0 points, standard error 0: no problem changed (paired, 200 problems)")
    m = held_out_metrics([True] * 4, [False] * 4)  # every problem flipped to right: every difference is 1
    assert gain_line(m["eval/accuracy"], m["eval/gain"], m["eval/gain_se"], 4) == (
        "held-out accuracy 0.000 -> 1.000: +100.0 points, standard error 0: every problem changed the same way "
        "(paired, 4 problems)")
    assert gain_line(0.5, -0.0, None, 200).endswith("+0.0 points, standard error undefined (paired, 200 problems)")
    assert gain_line(1.0, 1.0, 0.0, 1).endswith("standard error undefined (paired, 1 problem)")
    for args in [(0.485, 0.0, 0.0, 200), (0.4, 0.0, 0.01, 200), (0.4, 0.1, float("nan"), 200), (1.0, 1.0, 0.0, 1)]:
        assert "nan" not in gain_line(*args), args
