"""Admission control and staleness accounting: the one owner of ``max_staleness``.

After AReaL's staleness manager (Fu et al. 2025, "AReaL: a large-scale asynchronous reinforcement
learning system for language reasoning"). With ``P`` groups per learner step, group number ``d``
(0-based, FIFO) is trained at step ``d // P`` or earlier, so a new group is admitted only while

    groups kept + groups in flight < (max_staleness + version + 1) * P

and its request carries ``min_version = d // P - max_staleness``: the worker waits for weights at least
that new. No trained sample can then exceed the bound; the buffer's drop (`oldest_trainable`) is only
a backstop for out-of-order arrivals, whose freed slots are refilled. ``max_staleness = 0`` is the
synchronous on-policy schedule through the same code.

The manager is plain Python in the driver; the replay buffer gets the oldest trainable version per
call and keeps no bound of its own.

Left out on purpose: per-sample (rather than per-group) admission.
"""

from __future__ import annotations


class StalenessManager:
    """Counts groups dispatched, kept by the buffer, in flight and dropped; decides admission.

    Args:
        max_staleness: largest ``learner_version - oldest token version`` a trained sample may have,
            in policy versions (0: on-policy).
        prompts_per_step: groups per learner step (P).
        num_steps: learner steps of the run (nothing is admitted past ``num_steps * P`` groups).

    Raises:
        ValueError: a negative ``max_staleness`` or a non-positive ``prompts_per_step``.
    """

    def __init__(self, max_staleness: int, prompts_per_step: int, num_steps: int) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        if prompts_per_step < 1:
            raise ValueError(f"prompts_per_step must be >= 1, got {prompts_per_step}")
        self.max_staleness, self.prompts_per_step, self.num_steps = max_staleness, prompts_per_step, num_steps
        self.version = 0  # the learner's policy version
        self.dispatched = 0  # group ids handed out: g0, g1, ...
        self.kept = 0  # groups in the admission budget that reached the buffer
        self.in_flight = 0  # groups of requests sent and not collected
        self.ready = 0  # groups in the buffer trainable now (after the last drop)
        self.dropped = 0  # groups the buffer dropped as stale (backstop)
        self._collected: set[str] = set()  # kept groups counted in `kept`
        self._dropped_early: set[str] = set()  # dropped before their request was collected

    def _limit(self) -> int:
        P = self.prompts_per_step
        return min((self.max_staleness + self.version + 1) * P, self.num_steps * P)

    def capacity(self) -> int:
        """Groups that may be admitted now (>= 0)."""
        return max(0, self._limit() - self.kept - self.in_flight)

    def admit(self, k: int) -> tuple[list[str], int]:
        """Admit up to ``k`` new groups; returns their ids and the request's ``min_version``.

        The ids are empty when nothing may be admitted. The caller reports the request with `sent`.
        """
        k = min(k, self.capacity())
        if k <= 0:
            return [], 0
        pos = self.kept + self.in_flight  # FIFO position of the first group, at most
        # the last group is trained at step (pos + k - 1) // P at the latest
        min_version = max(0, (pos + k - 1) // self.prompts_per_step - self.max_staleness)
        keys = [f"g{self.dispatched + i}" for i in range(k)]
        self.dispatched += k
        return keys, min_version

    def sent(self, num_groups: int) -> None:
        """A request of ``num_groups`` groups went to a worker (new, re-issued or recovered)."""
        self.in_flight += num_groups

    def returned(self, num_groups: int) -> None:
        """A request of ``num_groups`` groups came back (finished or failed)."""
        self.in_flight -= num_groups

    def kept_group(self, key: str) -> None:
        """Group ``key`` reached the buffer: it counts against the budget (unless already dropped)."""
        if key in self._dropped_early:
            self._dropped_early.discard(key)
        elif key not in self._collected:
            self.kept += 1
            self._collected.add(key)

    def buffer_dropped(self, keys: list[str], fresh: int) -> None:
        """The buffer dropped ``keys`` as stale and holds ``fresh`` trainable groups: free their slots."""
        for key in keys:
            self.dropped += 1
            if key in self._collected:
                self._collected.discard(key)
                self.kept -= 1
            else:  # its request is not collected yet: do not count it when it is
                self._dropped_early.add(key)
        self.ready = fresh

    def took_batch(self) -> None:
        """The learner took one batch (``prompts_per_step`` ready groups)."""
        self.ready -= self.prompts_per_step

    def advance(self) -> None:
        """The learner finished a step: one policy version newer."""
        self.version += 1

    def oldest_trainable(self, learner_version: int | None = None) -> int:
        """Oldest policy version a token may come from to be trained at ``learner_version`` (default: now)."""
        return (self.version if learner_version is None else learner_version) - self.max_staleness

    def metrics(self) -> dict[str, float]:
        """``staleness/*`` gauges: groups in flight, kept and the stale drops so far (should stay 0)."""
        return {"staleness/in_flight_groups": float(self.in_flight), "staleness/kept_groups": float(self.kept),
                "staleness/dropped_groups_total": float(self.dropped)}

    def state_dict(self) -> dict:
        """Counters and id sets (JSON-able)."""
        return {"version": self.version, "dispatched": self.dispatched, "kept": self.kept, "dropped": self.dropped,
                "collected": sorted(self._collected), "dropped_early": sorted(self._dropped_early)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict`; nothing is in flight afterwards (re-issued requests call `sent`)."""
        self.version, self.dispatched, self.kept = state["version"], state["dispatched"], state["kept"]
        self.dropped = state["dropped"]
        self._collected, self._dropped_early = set(state["collected"]), set(state["dropped_early"])
        self.in_flight = self.ready = 0
