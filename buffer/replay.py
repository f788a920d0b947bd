"""Replay buffer of sample groups with a staleness bound.

The buffer stores whole groups (all samples of one prompt) because group-relative advantages
(GRPO/RLOO) need the whole group. `take_batch` hands out the oldest groups first and drops groups
with a token older than the oldest trainable policy version the caller names (counted in
`off_policy/dropped_*`). That version comes from `buffer.staleness.StalenessManager`, whose admission
control keeps stale data from being produced at all; the drop here is the backstop.

Curation hooks applied as groups arrive: DAPO dynamic sampling (zero-variance groups are counted and
not stored) and SPO's per-prompt value tracker (sets each sample's ``baseline``), both from
`buffer.curation`.

With ``prioritized = True`` a batch takes the highest-`group_priority` groups among the fresh-enough
ones instead of the oldest; passed-over groups age and are dropped (counted) once past the bound.

With a self-imitation store (`buffer.self_imitation`) a batch also carries replayed copies of earlier
successful samples, each as a one-sample group marked ``replayed`` after the fresh groups; they are not
dispatches (no staleness accounting, not in the ledger of taken groups, reported apart in `BatchStats`).

Left out on purpose: reuse of a whole group for more than one step.
"""

from __future__ import annotations

from collections import deque

from buffer.curation import PromptValueTracker, ZeroVarianceFilter, group_priority
from buffer.records import BatchStats
from buffer.sample import Sample, scored_rewards
from buffer.self_imitation import SelfImitationStore


def _too_old(group: list[Sample], min_version: int) -> bool:
    """Whether a sample of ``group`` has a token older than policy version ``min_version``."""
    return any(s.policy_versions and s.oldest_version < min_version for s in group)


class ReplayBuffer:
    """FIFO buffer of sample groups, bounded in policy lag.

    Runs in-process (tests) or as a Ray actor via ``ray.remote(ReplayBuffer)``.

    Args:
        capacity_groups: groups held at most; adding beyond raises instead of losing data.
        dynamic_sampling: drop groups whose rewards are all equal (counted, never stored).
        value_tracker_discount: when set, SPO's per-prompt value tracker with this discount fills
            every sample's ``baseline``.
        prioritized: take the highest-priority fresh groups first (`group_priority`), not FIFO.
        self_imitation: ``(capacity, fraction, min_reward)`` of a `SelfImitationStore` whose replays join each
            batch (``buffer.self_imitation``); None: no replay.
        seed: seed of the self-imitation draws.

    Raises:
        ValueError: on an empty group.
    """

    def __init__(self, capacity_groups: int = 100_000, dynamic_sampling: bool = False,
                 value_tracker_discount: float | None = None, prioritized: bool = False,
                 self_imitation: tuple[int, float, float] | None = None, seed: int = 0) -> None:
        self.capacity_groups = capacity_groups
        self.sil = SelfImitationStore(*self_imitation, seed=seed) if self_imitation else None
        self.filter = ZeroVarianceFilter() if dynamic_sampling else None
        self.values = PromptValueTracker(value_tracker_discount) if value_tracker_discount else None
        self.prioritized = prioritized
        self._taken_ids: set[str] = set()  # group ids handed out for training (resume de-duplication)
        self._groups: deque[list[Sample]] = deque()
        self._dropped_groups = 0
        self._dropped_samples = 0
        self._dropped_pending = 0  # samples dropped since the last batch (reported with it)

    def add_groups(self, groups: list[list[Sample]]) -> dict[str, int]:
        """Store groups (minus those dynamic sampling filters out).

        Returns ``{"kept": groups stored now, "kept_ids": their group ids, "held": groups held in all}``.

        Raises:
            ValueError: a group is empty, or capacity would be exceeded (nothing is stored then).
        """
        for g in groups:
            if not g:
                raise ValueError("ReplayBuffer.add_groups: got an empty group")
        if len(self._groups) + len(groups) > self.capacity_groups:
            raise ValueError(
                f"ReplayBuffer is full ({len(self._groups)} of {self.capacity_groups} groups); "
                f"refusing {len(groups)} more rather than dropping data"
            )
        kept = []
        if self.sil is not None:  # every arriving group updates its prompt's value, filtered ones too
            self.sil.observe(groups)
        for g in groups:
            if self.values is not None:
                b = self.values.baseline_then_update(g[0].prompt_id, scored_rewards(g))
                for s in g:
                    s.baseline = b
            if self.filter is None or self.filter.keep(g):
                self._groups.append(g)
                kept.append(g[0].group_id)
        return {"kept": len(kept), "kept_ids": kept, "held": len(self._groups)}

    def _drop(self, g: list[Sample]) -> None:
        self._dropped_groups += 1
        self._dropped_samples += len(g)
        self._dropped_pending += len(g)

    def drop_stale(self, min_version: int) -> dict:
        """Drop (and count) every held group with a token older than policy version ``min_version``.

        Returns ``{"fresh": groups left, all trainable now, "dropped_ids": ids dropped now}``; the
        orchestrator calls it before each step, so a batch is only requested when it can be full.
        """
        fresh, dropped = deque(), []
        for g in self._groups:
            if _too_old(g, min_version):
                self._drop(g)
                dropped.append(g[0].group_id)
            else:
                fresh.append(g)
        self._groups = fresh
        return {"fresh": len(fresh), "dropped_ids": dropped}

    def group_ids(self) -> tuple[set[str], set[str]]:
        """``(ids of groups held, ids of groups already taken for training)``."""
        return {g[0].group_id for g in self._groups}, set(self._taken_ids)

    def ledger(self) -> dict:
        """Where groups went: ``held`` and ``taken`` (id sets), ``filtered`` (dynamic sampling) and
        ``dropped`` (past the staleness bound) counts; cheap, unlike `state_dict` (no samples)."""
        f = self.filter.state_dict() if self.filter else None
        held, taken = self.group_ids()
        return {"held": held, "taken": taken, "filtered": f["seen"] - f["kept"] if f else 0,
                "dropped": self._dropped_groups}

    def peek_groups(self, group_ids: list[str]) -> list[list[Sample]]:
        """The held groups among ``group_ids``, in buffer order, left where they are (the run-time sentinel
        reads a few just sampled before they are trained)."""
        want = set(group_ids)
        return [g for g in self._groups if g[0].group_id in want]

    def size(self) -> int:
        """Number of groups held. A method, not ``__len__``: callable through a Ray actor handle
        (``buffer.size.remote()``), which has no ``len``."""
        return len(self._groups)

    def take_batch(self, num_groups: int, learner_version: int, min_version: int
                   ) -> tuple[list[list[Sample]], BatchStats]:
        """Remove and return up to ``num_groups`` fresh-enough groups, oldest (or highest-priority) first.

        Groups with a token older than policy version ``min_version`` are dropped and counted.
        Returns ``(groups, stats)``; ``groups`` is shorter than asked when the buffer runs out. With a
        self-imitation store, replayed samples follow as one-sample groups (`SelfImitationStore.draw`, drawn before
        this batch's successes are stored) and ``stats.replayed_ids`` names their groups.
        ``stats.metrics``: dropped count and fraction, staleness (``learner_version`` minus each
        sample's oldest token version) mean/max and histogram (``off_policy/staleness_frac_<lag>`` for
        lag 0..learner_version-min_version); ``stats.group_ids``: the groups handed out.
        """
        out: list[list[Sample]] = []
        if self.prioritized:  # drop everything past the bound, then take the best of the rest
            self.drop_stale(min_version)
            fresh = self._groups
            ranked = sorted(range(len(fresh)), key=lambda i: -group_priority(fresh[i]))  # stable: ties FIFO
            chosen = set(ranked[:num_groups])
            out = [fresh[i] for i in sorted(chosen, key=ranked.index)]
            self._groups = deque(g for i, g in enumerate(fresh) if i not in chosen)
        while self._groups and len(out) < num_groups:
            g = self._groups.popleft()
            if _too_old(g, min_version):
                self._drop(g)
                continue
            out.append(g)
        self._taken_ids.update(g[0].group_id for g in out)
        dropped_now, self._dropped_pending = self._dropped_pending, 0  # since the last batch
        lags = [s.staleness(learner_version) for g in out for s in g]
        taken = len(lags)
        metrics = {
            "off_policy/dropped_samples": float(dropped_now),
            "off_policy/dropped_frac": dropped_now / (dropped_now + taken) if dropped_now + taken else 0.0,
            "off_policy/dropped_samples_total": float(self._dropped_samples),
            "off_policy/staleness_mean": float(sum(lags) / len(lags)) if lags else 0.0,
            "off_policy/staleness_max": float(max(lags)) if lags else 0.0,
            "buffer/groups_left": float(len(self._groups)),
        }
        if self.filter is not None:
            metrics.update(self.filter.metrics())
        replayed: list[Sample] = []
        if self.sil is not None:
            replayed = self.sil.draw(taken)
            self.sil.store(out)
            metrics.update(self.sil.metrics(len(replayed), taken))
        # staleness histogram: fraction of trained samples at each lag 0..learner_version - min_version
        for lag in range(learner_version - min_version + 1):
            metrics[f"off_policy/staleness_frac_{lag}"] = lags.count(lag) / taken if taken else 0.0
        return out + [[s] for s in replayed], BatchStats(metrics, tuple(g[0].group_id for g in out),
                                                         tuple(s.group_id for s in replayed))

    def state_dict(self) -> dict:
        """Everything needed to resume: held groups and drop counters."""
        return {
            "groups": list(self._groups),
            "dropped_groups": self._dropped_groups,
            "dropped_samples": self._dropped_samples,
            "filter": self.filter.state_dict() if self.filter else None,
            "values": self.values.state_dict() if self.values else None,
            "taken_ids": sorted(self._taken_ids),
            "self_imitation": self.sil.state_dict() if self.sil else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict`."""
        self._groups = deque(state["groups"])
        self._dropped_groups = state["dropped_groups"]
        self._dropped_samples = state["dropped_samples"]
        self._taken_ids = set(state["taken_ids"])
        if self.filter is not None and state.get("filter"):
            self.filter.load_state_dict(state["filter"])
        if self.values is not None and state.get("values"):
            self.values.load_state_dict(state["values"])
        if self.sil is not None and state.get("self_imitation"):
            self.sil.load_state_dict(state["self_imitation"])
