"""`RunClock`: the training loop's wall clocks and training totals, in one object with a `state_dict`.

Training time runs from the end of one learner step (or the run's start) to the end of the next;
the loop calls `RunClock.restart` after held-out evals and checkpoint writes, so those are left out of
``train_seconds``, of ``perf/step_seconds`` and of the ``time_budget_s`` check. While no learner step
runs, the learner is idle; that time is reported as ``perf/learner_wait_*``.

Left out on purpose: rollout counters (`orchestrator.tally.RolloutTally`) and the policy version
(`buffer.StalenessManager`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class RunClock:
    """Wall clocks (``time.perf_counter`` seconds) and totals of a run's training.

    Attributes:
        train_seconds: training wall clock of the finished steps (checkpointed).
        trained_samples: samples trained on so far (checkpointed).
        learner_wait: seconds the learner sat idle, waiting for a full batch, during the running step.
        step_start: when the running step's clock started (`restart`).
        idle_since: when the learner last became idle (`restart`).
    """

    train_seconds: float = 0.0
    trained_samples: int = 0
    learner_wait: float = 0.0
    step_start: float = field(default_factory=time.perf_counter)
    idle_since: float = field(default_factory=time.perf_counter)

    def restart(self) -> None:
        """Start the next step's clock now; the learner is idle from now until `learner_busy`."""
        self.step_start = self.idle_since = time.perf_counter()

    def learner_busy(self) -> None:
        """A learner step starts: the time since the learner became idle counts as waiting."""
        self.learner_wait += time.perf_counter() - self.idle_since

    def out_of_time(self, budget_s: float) -> bool:
        """Whether the training time, the running step's included, reached ``budget_s`` (0: no budget)."""
        return bool(budget_s) and self.train_seconds + time.perf_counter() - self.step_start >= budget_s

    def end_step(self, samples: int) -> dict[str, float]:
        """Close the running step, which trained ``samples`` samples: add it to the totals and start the
        learner-wait count afresh. Returns the step's ``perf/*`` metrics (the driver's own clock: one
        value per step, nothing to combine across ranks or workers)."""
        elapsed = time.perf_counter() - self.step_start
        self.train_seconds += elapsed
        self.trained_samples += samples
        wait, self.learner_wait = self.learner_wait, 0.0
        return {"perf/learner_wait_seconds": wait, "perf/step_seconds": elapsed,
                "perf/train_seconds": self.train_seconds, "perf/learner_wait_frac": wait / max(elapsed, 1e-9)}

    def samples_per_s(self) -> float:
        """Samples trained per second of training time, over the run so far."""
        return self.trained_samples / max(self.train_seconds, 1e-9)

    def state_dict(self) -> dict:
        """The run totals (the clocks themselves restart with the resumed run)."""
        return {"train_seconds": self.train_seconds, "trained_samples": self.trained_samples}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict`."""
        self.train_seconds, self.trained_samples = float(state["train_seconds"]), int(state["trained_samples"])
