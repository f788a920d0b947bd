"""The progress bar of a run: one tick per learner step with the figures users watch."""

from __future__ import annotations


class StepProgress:
    """A tqdm bar over learner steps (disabled with ``enabled=False``); use as a context manager.

    Args:
        num_steps: steps of the run.
        initial: steps already done (a resumed run).
        enabled: draw the bar (False in tests and CI logs).
    """

    def __init__(self, num_steps: int, initial: int, enabled: bool) -> None:
        self.num_steps, self.initial, self.enabled = num_steps, initial, enabled
        self.bar = None

    def __enter__(self) -> StepProgress:
        from tqdm import tqdm

        self.bar = tqdm(total=self.num_steps, initial=self.initial, disable=not self.enabled, desc="train", unit="step")
        return self

    def update(self, m: dict, samples_per_s: float) -> None:
        """One step done; ``m`` is its metrics record."""
        def num(k: str) -> float:
            return m[k] if m.get(k) is not None else float("nan")

        self.bar.update(1)
        self.bar.set_postfix(samples_s=f"{samples_per_s:.2f}", reward=f"{num('rollout/reward_mean'):.3f}",
                             acc=f"{num('eval/accuracy'):.3f}", stale=f"{num('off_policy/staleness_max'):.0f}",
                             wait=f"{num('perf/learner_wait_frac'):.0%}")

    def __exit__(self, *exc) -> None:
        self.bar.close()
