"""Self-imitation replay: a bounded store of past successful samples, some of which join each batch again.

Self-imitation learning (Oh et al. 2018, "Self-Imitation Learning", ICML) replays the agent's own past episodes
whose return exceeded the current value estimate and trains on them with the positive part of that gap;
SPEAR (2025, "SPEAR: Self-imitation with Progressive Exploration for Agentic Reinforcement Learning") keeps a
buffer of successful trajectories for LLM agents the same way. Here:

- every sample of a group the learner takes whose reward is at least ``min_reward`` (and whose reward function
  did not fail) enters the store, at most ``capacity`` samples, the oldest evicted first;
- each prompt's value estimate is the mean reward of its newest group (`observe`): the Monte-Carlo value of the
  policy that sampled it, the freshest one the buffer holds;
- a batch of ``n`` fresh samples gets ``round(fraction * n)`` replayed ones, drawn uniformly without replacement
  among the stored samples whose reward still exceeds their prompt's value (SIL's "only where the return beats
  the current baseline"; a prompt the policy now always solves replays nothing), each a copy marked
  ``replayed`` whose ``baseline`` is that value. Samples of the batch itself enter the store after the draw: a
  replay always comes from an earlier step.

Replayed samples are not new dispatches: they never count in the staleness accounting
(`buffer.StalenessManager`), the ledger of taken groups, or the ``off_policy/staleness_*`` metrics, and their
policy versions may be far older than ``buffer.max_staleness``; the learner trains them with the
self-imitation term only (`learner.self_imitation`), which has no importance ratio.

Left out on purpose: SIL's prioritised sampling by ``(R - V)+`` (draws are uniform among the eligible ones),
and SPEAR's curriculum between exploration and imitation.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque

from buffer.sample import Sample, scored_rewards


class SelfImitationStore:
    """Bounded store of successful samples and per-prompt value estimates (see the module docstring).

    Args:
        capacity: samples held at most (oldest evicted first).
        fraction: replayed samples per fresh sample of a batch (0: the store fills but never replays).
        min_reward: lowest reward a sample needs to be stored.
        seed: seed of the draws.

    Raises:
        ValueError: ``capacity < 1`` or ``fraction`` outside ``[0, 1]``.
    """

    def __init__(self, capacity: int, fraction: float, min_reward: float, seed: int = 0) -> None:
        if capacity < 1 or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"self-imitation store: capacity = {capacity} must be >= 1 and fraction = {fraction} "
                             "in [0, 1] (buffer.self_imitation)")
        self.capacity, self.fraction, self.min_reward = capacity, fraction, min_reward
        self._samples: deque[Sample] = deque(maxlen=capacity)
        self._values: dict[str, float] = {}  # prompt id -> mean reward of its newest group
        self._rng = random.Random(seed)
        self._replayed_total = 0

    def observe(self, groups: list[list[Sample]]) -> None:
        """Update the value estimate of each group's prompt: the mean of its scored rewards (a group whose every
        reward failed changes nothing)."""
        for g in groups:
            r = scored_rewards(g)
            if r:
                self._values[g[0].prompt_id] = sum(r) / len(r)

    def value(self, prompt_id: str) -> float | None:
        """The prompt's value estimate (mean reward of its newest group), None if never observed."""
        return self._values.get(prompt_id)

    def store(self, groups: list[list[Sample]]) -> int:
        """Keep the samples of ``groups`` with ``reward >= min_reward``, status not ``failed`` and a trained
        token; returns how many were stored."""
        new = [s for g in groups for s in g
               if s.status != "failed" and s.reward >= self.min_reward and any(s.loss_mask)]
        self._samples.extend(new)
        return len(new)

    def draw(self, fresh_samples: int) -> list[Sample]:
        """``round(fraction * fresh_samples)`` replayed copies (fewer when fewer are eligible): stored samples
        whose reward exceeds their prompt's value, drawn uniformly without replacement, each with
        ``replayed = True`` and ``baseline`` = that value (the learner's self-imitation advantage is
        ``reward - baseline``, clipped)."""
        want = round(self.fraction * fresh_samples)
        if want <= 0:
            return []
        eligible = [s for s in self._samples if s.reward > self._values.get(s.prompt_id, float("-inf"))]
        chosen = self._rng.sample(eligible, min(want, len(eligible)))
        self._replayed_total += len(chosen)
        return [dataclasses.replace(s, replayed=True, baseline=self._values.get(s.prompt_id, 0.0)) for s in chosen]

    def metrics(self, replayed: int, fresh: int) -> dict[str, float]:
        """``buffer/sil_*`` metrics of a batch with ``replayed`` replayed and ``fresh`` fresh samples: the replayed
        share of its samples, the count, the store's size and the replays so far (each once per batch: the buffer
        is one actor)."""
        n = replayed + fresh
        return {"buffer/sil_replayed_frac": replayed / n if n else 0.0, "buffer/sil_replayed_samples": float(replayed),
                "buffer/sil_store_size": float(len(self._samples)),
                "buffer/sil_replayed_total": float(self._replayed_total)}

    def state_dict(self) -> dict:
        """Stored samples, value estimates, the draw RNG's state and the replay count."""
        return {"samples": list(self._samples), "values": dict(self._values), "rng": self._rng.getstate(),
                "replayed_total": self._replayed_total}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict` (samples beyond this store's capacity: the newest kept)."""
        self._samples = deque(state["samples"], maxlen=self.capacity)
        self._values = dict(state["values"])
        self._rng.setstate(state["rng"])
        self._replayed_total = state["replayed_total"]
