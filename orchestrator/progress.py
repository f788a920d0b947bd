"""The progress bar of a run: one tick per learner step with the figures users watch.

A figure a step did not record shows as ``-`` (never ``nan``); the held-out accuracy is the last one
evaluated (``eval/accuracy`` is logged only on eval steps), so it stays on the bar between evals.
"""

from __future__ import annotations

import math

MISSING = "-"  # a figure not recorded (yet)


class StepProgress:
    """A tqdm bar over learner steps (disabled with ``enabled=False``); use as a context manager.

    Args:
        num_steps: steps of the run.
        initial: steps already done (a resumed run).
        enabled: draw the bar (False in tests and CI logs).
        start: the metrics record the run starts from (the start eval's, or a resumed run's last), whose
            ``eval/accuracy``, if any, the bar shows until the next eval; None: ``acc=-`` until the first.
    """

    def __init__(self, num_steps: int, initial: int, enabled: bool, start: dict | None = None) -> None:
        self.num_steps, self.initial, self.enabled = num_steps, initial, enabled
        acc = (start or {}).get("eval/accuracy")
        self.accuracy: float | None = acc if _recorded(acc) else None  # the last held-out accuracy seen
        self.bar = None

    def __enter__(self) -> StepProgress:
        from tqdm import tqdm

        self.bar = tqdm(total=self.num_steps, initial=self.initial, disable=not self.enabled, desc="train", unit="step")
        return self

    def update(self, m: dict, samples_per_s: float) -> None:
        """One step done; ``m`` is its metrics record (a key missing or None: not recorded this step)."""
        if _recorded(m.get("eval/accuracy")):
            self.accuracy = m["eval/accuracy"]

        def fmt(v: float | None, spec: str) -> str:
            return format(v, spec) if _recorded(v) else MISSING

        self.bar.update(1)
        self.bar.set_postfix(samples_s=f"{samples_per_s:.2f}", reward=fmt(m.get("rollout/reward_mean"), ".3f"),
                             acc=fmt(self.accuracy, ".3f"), stale=fmt(m.get("off_policy/staleness_max"), ".0f"),
                             wait=fmt(m.get("perf/learner_wait_frac"), ".0%"))

    def __exit__(self, *exc) -> None:
        self.bar.close()


def _recorded(v: float | None) -> bool:
    """A value was recorded: not None and finite (`orchestrator.metrics.MetricsLogger` logs non-finite as None)."""
    return v is not None and math.isfinite(v)
