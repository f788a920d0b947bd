"""The run's progress bar (`orchestrator.progress.StepProgress`): the figures it shows after each step."""

from __future__ import annotations

from orchestrator.progress import StepProgress


def _postfix(bar: StepProgress) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in bar.bar.postfix.split(", "))


def _step(step: int, acc: float | None = None) -> dict:
    rec = {"step": step, "rollout/reward_mean": 0.25, "off_policy/staleness_max": 1.0, "perf/learner_wait_frac": 0.3}
    return {**rec, "eval/accuracy": acc} if acc is not None else rec


def test_acc_is_the_last_held_out_accuracy_seen_and_a_dash_before_the_first():
    with StepProgress(20, 8, enabled=False) as bar:  # a resumed run whose last record had no eval
        bar.update(_step(9), 1.5)
        assert _postfix(bar) == {"samples_s": "1.50", "reward": "0.250", "acc": "-", "stale": "1", "wait": "30%"}
        bar.update(_step(10, acc=0.485), 1.5)
        assert _postfix(bar)["acc"] == "0.485"
        bar.update(_step(11), 1.5)  # no eval at this step: the step-10 accuracy stays
        assert _postfix(bar)["acc"] == "0.485"
        bar.update({**_step(12), "eval/accuracy": None}, 1.5)  # logged as None (not finite): not an eval
        assert _postfix(bar)["acc"] == "0.485"
        bar.update(_step(20, acc=0.495), 1.5)
        assert _postfix(bar)["acc"] == "0.495"


def test_the_start_eval_shows_until_the_next_and_a_missing_figure_is_a_dash_not_nan():
    with StepProgress(5, 0, enabled=False, start={"step": 0, "eval/accuracy": 0.455}) as bar:
        bar.update({"step": 1, "rollout/reward_mean": None, "perf/learner_wait_frac": float("nan")}, 0.0)
        shown = _postfix(bar)
        assert shown == {"samples_s": "0.00", "reward": "-", "acc": "0.455", "stale": "-", "wait": "-"}
        assert "nan" not in bar.bar.postfix
