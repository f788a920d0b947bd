"""Curation state: which generated groups are worth training on, and what each prompt is worth.

- `ZeroVarianceFilter`: DAPO's dynamic sampling gate (groups with all-equal rewards carry no
  group-relative gradient).
- `PassRateTracker`: per-prompt Beta posterior over the pass rate, fed by every group seen.
- `PromptValueTracker`: SPO's persistent per-prompt baseline (a discounted Beta tracker).
- `allocate_rollouts`: Knapsack-RL's budgeted samples-per-prompt allocation (pure function).
- `group_priority`: a variance-plus-diversity score for prioritised replay (pure function).

Every stateful class has ``state_dict()`` / ``load_state_dict()`` and reports ``curation/*``
metrics. Left out on purpose: the prompt samplers (`buffer.prompt_sampler`) and the orchestrator's
refill logic (`orchestrator.loop`).
"""

from __future__ import annotations

import heapq
import math

from buffer.sample import Sample, scored_rewards


def reward_std(group: list[Sample]) -> float:
    """Population std of a group's scored rewards (`scored_rewards`: samples whose reward failed are
    left out); 0 for all-equal rewards or fewer than two scored samples."""
    rs = scored_rewards(group)
    if len(rs) < 2:
        return 0.0
    mean = sum(rs) / len(rs)
    return math.sqrt(sum((r - mean) ** 2 for r in rs) / len(rs))


class ZeroVarianceFilter:
    """Dynamic sampling (Yu et al. 2025, "DAPO", section 3.2): keep only groups whose rewards differ.

    Counts what it saw so the orchestrator can report the refill cost (groups generated per group
    kept).
    """

    def __init__(self, eps: float = 1e-6) -> None:
        self.eps, self.seen, self.kept = eps, 0, 0

    def keep(self, group: list[Sample]) -> bool:
        """Whether to train on ``group``; updates the counters."""
        self.seen += 1
        ok = reward_std(group) > self.eps
        self.kept += int(ok)
        return ok

    def metrics(self) -> dict[str, float]:
        """Totals so far: groups seen and kept, fraction filtered."""
        return {"curation/filter_groups_seen": float(self.seen), "curation/filter_groups_kept": float(self.kept),
                "curation/filter_zero_variance_frac": 1.0 - self.kept / self.seen if self.seen else 0.0}

    def state_dict(self) -> dict:
        return {"eps": self.eps, "seen": self.seen, "kept": self.kept}

    def load_state_dict(self, state: dict) -> None:
        self.eps, self.seen, self.kept = state["eps"], state["seen"], state["kept"]


class PassRateTracker:
    """Per-prompt Beta(alpha, beta) posterior over the pass rate (probability of reward 1).

    Each group adds its reward sum to alpha and ``n - sum`` to beta (rewards clipped to [0, 1], so
    partial credit counts fractionally). Unseen prompts have the prior ``Beta(prior_alpha, prior_beta)``.

    Raises:
        ValueError: non-positive prior.
    """

    def __init__(self, prior_alpha: float = 1.0, prior_beta: float = 1.0) -> None:
        if prior_alpha <= 0 or prior_beta <= 0:
            raise ValueError(f"Beta prior must be positive, got ({prior_alpha}, {prior_beta})")
        self.prior = (prior_alpha, prior_beta)
        self.counts: dict[str, list[float]] = {}  # prompt_id -> [successes, failures]

    def update(self, prompt_id: str, rewards: list[float]) -> None:
        """Add one group's rewards for ``prompt_id``."""
        s = sum(min(max(r, 0.0), 1.0) for r in rewards)
        c = self.counts.setdefault(prompt_id, [0.0, 0.0])
        c[0] += s
        c[1] += len(rewards) - s

    def posterior(self, prompt_id: str) -> tuple[float, float]:
        """``(alpha, beta)`` of the prompt's posterior."""
        s, f = self.counts.get(prompt_id, (0.0, 0.0))
        return self.prior[0] + s, self.prior[1] + f

    def mean(self, prompt_id: str) -> float:
        """Posterior mean pass rate."""
        a, b = self.posterior(prompt_id)
        return a / (a + b)

    def metrics(self, bins: int = 5) -> dict[str, float]:
        """Prompts seen and a histogram of posterior-mean pass rates (``curation/pass_rate_frac_<bin>``)."""
        out = {"curation/prompts_seen": float(len(self.counts))}
        means = [self.mean(p) for p in self.counts]
        for i in range(bins):
            lo, hi = i / bins, (i + 1) / bins
            n = sum(1 for m in means if lo <= m < hi or (i == bins - 1 and m == 1.0))
            out[f"curation/pass_rate_frac_{lo:.1f}_{hi:.1f}"] = n / len(means) if means else 0.0
        return out

    def state_dict(self) -> dict:
        return {"prior": list(self.prior), "counts": {k: list(v) for k, v in self.counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.prior = tuple(state["prior"])
        self.counts = {k: list(v) for k, v in state["counts"].items()}


class PromptValueTracker:
    """SPO's per-prompt value estimate, used as the advantage baseline instead of the group mean.

    A discounted Beta tracker: on each observed reward ``r`` of a prompt,
    ``alpha <- rho * alpha + r``, ``beta <- rho * beta + (1 - r)``; the value is ``alpha / (alpha + beta)``.
    Source: Xu et al. 2025, "Single-stream Policy Optimization" (SPO), section 3.1 (they adapt rho to
    the policy's KL change; a fixed ``discount`` is used here). The baseline of a sample must be read
    before its own reward updates the tracker, which `baseline_then_update` does.

    Raises:
        ValueError: ``discount`` outside ``(0, 1]`` or a non-positive prior.
    """

    def __init__(self, discount: float = 0.9, prior: float = 1.0) -> None:
        if not 0.0 < discount <= 1.0:
            raise ValueError(f"value tracker discount must be in (0, 1], got {discount}")
        if prior <= 0:
            raise ValueError(f"value tracker prior must be > 0, got {prior}")
        self.discount, self.prior = discount, prior
        self.ab: dict[str, list[float]] = {}

    def value(self, prompt_id: str) -> float:
        """Current estimate of the prompt's expected reward (0.5 for an unseen prompt)."""
        a, b = self.ab.get(prompt_id, (self.prior, self.prior))
        return a / (a + b)

    def baseline_then_update(self, prompt_id: str, rewards: list[float]) -> float:
        """Return the baseline for these samples (value before seeing them), then fold them in."""
        v = self.value(prompt_id)
        ab = self.ab.setdefault(prompt_id, [self.prior, self.prior])
        for r in rewards:
            r = min(max(r, 0.0), 1.0)
            ab[0], ab[1] = self.discount * ab[0] + r, self.discount * ab[1] + 1.0 - r
        return v

    def state_dict(self) -> dict:
        return {"discount": self.discount, "prior": self.prior, "ab": {k: list(v) for k, v in self.ab.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.discount, self.prior = state["discount"], state["prior"]
        self.ab = {k: list(v) for k, v in state["ab"].items()}


def informative_group_value(p: float, n: int) -> float:
    """Expected gradient value of ``n`` samples of a prompt with pass rate ``p``.

    ``P(group has both outcomes) * p * (1 - p) = (1 - p**n - (1 - p)**n) * p * (1 - p)``: the
    probability that a group-relative advantage is non-zero times the Bernoulli reward variance
    (Li et al. 2025, "Knapsack RL: Unlocking Exploration of LLMs via Optimizing Budget Allocation",
    their value of a (prompt, budget) item). Increasing and concave in ``n``.
    """
    if n <= 1:
        return 0.0
    return (1.0 - p**n - (1.0 - p) ** n) * p * (1.0 - p)


def allocate_rollouts(pass_rates: list[float], budget: int, min_n: int = 2, max_n: int = 64) -> list[int]:
    """Split ``budget`` samples over prompts to maximise the summed `informative_group_value`.

    Every prompt gets ``min_n``; the rest goes one sample at a time to the prompt with the largest
    marginal gain (optimal for values concave in n, as here). Ties go to the earlier prompt.

    Args:
        pass_rates: estimated pass rate of each prompt, in [0, 1].
        budget: total samples for this step.
        min_n, max_n: per-prompt bounds.

    Returns:
        samples per prompt, summing to ``budget``.

    Raises:
        ValueError: ``budget`` outside ``[len * min_n, len * max_n]``, ``min_n > max_n``, or a pass
            rate outside [0, 1].
    """
    k = len(pass_rates)
    if min_n > max_n or min_n < 1:
        raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
    if not k * min_n <= budget <= k * max_n:
        raise ValueError(f"budget {budget} must lie in [{k * min_n}, {k * max_n}] for {k} prompts")
    if any(not 0.0 <= p <= 1.0 for p in pass_rates):
        raise ValueError(f"pass rates must lie in [0, 1], got {pass_rates}")
    n = [min_n] * k
    gain = lambda i: informative_group_value(pass_rates[i], n[i] + 1) - informative_group_value(pass_rates[i], n[i])  # noqa: E731
    heap = [(-gain(i), i) for i in range(k) if n[i] < max_n]
    heapq.heapify(heap)
    for _ in range(budget - k * min_n):
        _, i = heapq.heappop(heap)
        n[i] += 1
        if n[i] < max_n:
            heapq.heappush(heap, (-gain(i), i))
    return n


def group_priority(group: list[Sample], diversity_weight: float = 0.5) -> float:
    """Replay priority of a group: reward std plus ``diversity_weight`` times the fraction of distinct
    responses.

    In the spirit of variance-aware sampling (MMR1, 2025: outcome variance plus trajectory diversity);
    groups with more reward spread and less duplicated responses carry more learning signal.
    """
    distinct = len({tuple(s.response_ids) for s in group}) / len(group)
    return reward_std(group) + diversity_weight * distinct
