"""How many samples each dispatched prompt gets: a fixed group size, or Knapsack RL budgets.

Knapsack RL (Li et al. 2025, "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget
Allocation") treats each prompt's group size as an item in a knapsack: with a fixed total budget per
step, samples go where they most raise the chance that a group carries gradient (some correct and
some wrong answers), i.e. to prompts of intermediate estimated pass rate, away from prompts the
policy always or never solves. `RolloutAllocator` takes a step's worth of prompts at a time from the
prompt sampler, splits ``prompts_per_step * group_size`` samples over them with `allocate_rollouts`,
and hands them out request by request.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict

from buffer.curation import allocate_rollouts
from buffer.records import Problem


class RolloutAllocator:
    """Pairs each prompt to dispatch with its group size.

    Args:
        mode: ``"uniform"`` (every prompt gets ``group_size``) or ``"knapsack"``.
        group_size: mean samples per prompt; the per-step budget is ``prompts_per_step * group_size``.
        prompts_per_step: prompts allocated together (one learner step's worth).
        min_n, max_n: per-prompt bounds for ``knapsack``.

    Raises:
        ValueError: unknown mode, or ``group_size`` outside ``[min_n, max_n]`` for ``knapsack``.
    """

    def __init__(self, mode: str, group_size: int, prompts_per_step: int, min_n: int = 2, max_n: int = 32) -> None:
        if mode not in ("uniform", "knapsack"):
            raise ValueError(f"rollout allocation must be 'uniform' or 'knapsack', got {mode!r}")
        if mode == "knapsack" and not min_n <= group_size <= max_n:
            raise ValueError(f"knapsack allocation needs min_n <= group_size <= max_n, got {min_n}, {group_size}, {max_n}")
        self.mode, self.group_size, self.prompts_per_step = mode, group_size, prompts_per_step
        self.min_n, self.max_n = min_n, max_n
        self._queue: deque[tuple[Problem, int]] = deque()  # (problem, n) allocated, not yet dispatched
        self._sizes: list[int] = []  # group sizes handed out since the last metrics() call

    def take(self, sampler, k: int) -> tuple[list, list[int]]:
        """Next ``k`` problems (from ``sampler.take``) and their group sizes.

        For ``knapsack``, whenever the queue runs short a whole step of prompts is drawn and the
        budget split over them at the sampler's current pass-rate estimates (``sampler.pass_rate``).
        """
        if self.mode == "uniform":
            problems = sampler.take(k)
            sizes = [self.group_size] * k
        else:
            while len(self._queue) < k:
                fresh = sampler.take(self.prompts_per_step)
                sizes = allocate_rollouts([sampler.pass_rate(p.prompt_id) for p in fresh],
                                          self.prompts_per_step * self.group_size, self.min_n, self.max_n)
                self._queue.extend(zip(fresh, sizes))
            problems, sizes = map(list, zip(*(self._queue.popleft() for _ in range(k))))
        self._sizes.extend(sizes)
        return problems, sizes

    def metrics(self) -> dict[str, float]:
        """``curation/group_size_{mean,min,max}`` of the groups dispatched since the last call."""
        sizes, self._sizes = self._sizes, []
        if not sizes:
            return {}
        return {"curation/group_size_mean": sum(sizes) / len(sizes), "curation/group_size_min": float(min(sizes)),
                "curation/group_size_max": float(max(sizes))}

    def state_dict(self) -> dict:
        """Allocated but undispatched prompts (as dicts) with their sizes."""
        return {"queue": [(asdict(p), n) for p, n in self._queue]}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict`."""
        self._queue = deque((Problem(**p), n) for p, n in state["queue"])
