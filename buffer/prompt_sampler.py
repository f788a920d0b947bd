"""Which prompts to roll out next: uniform epochs, or difficulty-aware sampling from pass rates.

Both samplers have the same interface: ``take(k)`` returns ``k`` problems, ``update(prompt_id,
rewards)`` feeds back a generated group (both keep a per-prompt pass-rate posterior, read with
``pass_rate``), ``state_dict()`` / ``load_state_dict()`` resume them, and ``metrics()`` reports
``curation/*``. `PROMPT_SAMPLERS` is keyed by ``buffer.prompt_sampler``.

Left out on purpose: curriculum schedules defined by hand, dataset-level mixing weights.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np

from buffer.curation import PassRateTracker, informative_group_value


class UniformSampler:
    """Endless, seeded, epoch-shuffled walk over the problems (state: epoch and position).

    Pass rates are tracked (for metrics and Knapsack budgets) but do not change the order.
    """

    def __init__(self, problems: list, seed: int, **_: Any) -> None:
        if not problems:
            raise ValueError("UniformSampler needs at least one problem")
        self.problems, self.seed, self.epoch, self.pos = problems, seed, 0, 0
        self.tracker = PassRateTracker()
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list:
        """Next ``k`` problems."""
        out = []
        for _ in range(k):
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.problems[self._order[self.pos]])
            self.pos += 1
        return out

    def update(self, prompt_id: str, rewards: list[float]) -> None:
        """Fold a group's rewards into the prompt's pass-rate posterior (the order is unaffected)."""
        self.tracker.update(prompt_id, rewards)

    def pass_rate(self, prompt_id: str) -> float:
        """Posterior-mean pass rate of the prompt (0.5 when unseen)."""
        return self.tracker.mean(prompt_id)

    def metrics(self) -> dict[str, float]:
        return {"curation/sampler_epoch": float(self.epoch), **self.tracker.metrics()}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        if "tracker" in state:
            self.tracker.load_state_dict(state["tracker"])
        self._order = self._shuffle()


class DifficultySampler:
    """Prefers prompts in the learning zone, where a group is most likely to carry gradient.

    Each prompt's weight is `informative_group_value` at its posterior-mean pass rate (largest at
    p = 0.5, zero at p in {0, 1}); the sampling probability mixes that with a uniform floor,
    ``pi_i = (1 - floor) * w_i / sum(w) + floor / N``, so no prompt is ever starved. Unseen prompts
    have the prior mean 0.5 and hence the highest weight: they are explored first (optimism). Draws
    within one ``take`` are without replacement. In the spirit of the pass-rate filters of
    Polaris/DAPO-style curricula and of Knapsack RL's value of a prompt.

    Args:
        problems: the training problems (each has ``prompt_id``).
        seed: RNG seed.
        group_size: samples per group (the ``n`` in the value).
        floor: uniform mixture weight in ``[0, 1]``.
        prior_alpha, prior_beta: Beta prior of unseen prompts.

    Raises:
        ValueError: empty ``problems`` or ``floor`` outside ``[0, 1]``.
    """

    def __init__(self, problems: list, seed: int, group_size: int = 8, floor: float = 0.05,
                 prior_alpha: float = 1.0, prior_beta: float = 1.0) -> None:
        if not problems:
            raise ValueError("DifficultySampler needs at least one problem")
        if not 0.0 <= floor <= 1.0:
            raise ValueError(f"sampler floor must be in [0, 1], got {floor}")
        self.problems, self.group_size, self.floor = problems, group_size, floor
        self.tracker = PassRateTracker(prior_alpha, prior_beta)
        self.rng = np.random.default_rng(seed)
        self.taken = 0

    def probabilities(self) -> np.ndarray:
        """``[N]`` sampling probability of every problem."""
        w = np.array([informative_group_value(self.tracker.mean(p.prompt_id), self.group_size) for p in self.problems])
        n = len(self.problems)
        base = w / w.sum() if w.sum() > 0 else np.full(n, 1.0 / n)
        return (1.0 - self.floor) * base + self.floor / n

    def take(self, k: int) -> list:
        """``k`` problems drawn without replacement (with replacement only if ``k`` > N)."""
        p = self.probabilities()
        idx = self.rng.choice(len(self.problems), size=k, replace=k > len(self.problems), p=p)
        self.taken += k
        return [self.problems[i] for i in idx]

    def update(self, prompt_id: str, rewards: list[float]) -> None:
        """Fold a generated group's rewards into the prompt's pass-rate posterior."""
        self.tracker.update(prompt_id, rewards)

    def pass_rate(self, prompt_id: str) -> float:
        """Posterior-mean pass rate of the prompt (the prior mean when unseen)."""
        return self.tracker.mean(prompt_id)

    def metrics(self) -> dict[str, float]:
        return self.tracker.metrics()

    def state_dict(self) -> dict:
        return {"tracker": self.tracker.state_dict(), "rng": self.rng.bit_generator.state, "taken": self.taken}

    def load_state_dict(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.rng.bit_generator.state = state["rng"]
        self.taken = state["taken"]


PROMPT_SAMPLERS = {"uniform": UniformSampler, "difficulty": DifficultySampler}
"""Registry keyed by `BufferConfig.prompt_sampler`."""
