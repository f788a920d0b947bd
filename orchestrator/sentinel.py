"""`Sentinel`: during a run, check that the learner and the rollout engines compute the same logprobs.

At step 0 and every ``sentinel.every_steps`` steps (version ``v``), the learner's next step waits until a
generate request admitted at version ``v`` (its ``min_version``) comes back with kept groups: the worker
that served it sampled them with the weights of ``v`` exactly, as the learner holds ``v`` until its next
step. The learner then scores a few of those responses (`learner.LearnerWorker.probe`, submitted before
its step, so with the same weights) and compares its logprobs with the engine's behaviour logprobs
(`learner.sentinel.logprob_gap`). A gap past ``sentinel.max_mean_abs_logprob_diff`` or
``sentinel.max_mismatch_kl`` stops the run with one line naming the worker, the version and the gap
(`SentinelError`), before the step's weights are pushed. It catches what makes the two sides compute
different distributions: a model feature one side does not implement, a kernel bug, a bad weight push.

The wait costs the learner about one generate request every ``every_steps`` steps in async mode (none
in sync mode, where the next batch is generated at ``v`` anyway). A resumed run checks at its first step
(its weights were just pushed). The check runs on one worker at a time: the one whose request came back
first.

Left out on purpose: checking every worker at every check, and engine logprobs of tokens the engine did
not sample (the prefill path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from orchestrator.remote import wait_all

if TYPE_CHECKING:
    from buffer import RolloutResult
    from orchestrator.config import SentinelConfig

logger = logging.getLogger(__name__)


MAX_EMPTY_RESULTS = 8
"""Requests at a check's version that may come back with no kept group (dynamic sampling filtered them all)
before the check is skipped: the learner's step waits on the check, and with every group filtered it would
wait for ever."""


class SentinelError(RuntimeError):
    """The learner and a rollout engine disagree on the logprobs of tokens sampled with the same weights."""


@dataclass
class Probe:
    """A check in flight: rank refs of `LearnerGroup.probe_remote`, the ``worker`` (slot) that sampled the
    responses and the policy ``version`` both sides hold."""

    refs: list
    worker: int
    version: int


class Sentinel:
    """Decides when to check, finds responses sampled at the learner's version, judges the gap.

    Args:
        cfg: the ``[sentinel]`` section.
        max_staleness: ``buffer.max_staleness``. Requests admitted at version ``v`` exist only while
            ``v + max_staleness < num_steps``, so later versions are not checked.
        num_steps: the run's learner steps.
    """

    def __init__(self, cfg: SentinelConfig, max_staleness: int, num_steps: int) -> None:
        self.cfg, self.last = cfg, num_steps - 1 - max_staleness  # the last version a check can run at
        self.due: int | None = None  # version of the next check
        self.found: tuple[int, tuple[str, ...]] | None = None  # (worker, group ids) sampled at `due`
        self.empty = 0  # requests at `due` that came back with every group filtered
        self.start_at(0)

    def start_at(self, version: int) -> None:
        """The run starts (or resumes) at ``version``: check there first."""
        self._schedule(version)

    def _schedule(self, version: int) -> None:
        self.due = version if self.cfg.every_steps and version <= self.last else None
        self.found, self.empty = None, 0

    def saw(self, min_version: int, result: RolloutResult) -> None:
        """A generate request admitted with ``min_version`` came back as ``result``; its kept groups are the
        check's responses when it is the first at or past the due version (the learner holds that version
        until the check, so the worker had exactly it)."""
        if self.due is None or self.found is not None or min_version < self.due:
            return
        if result.kept_keys:
            self.found = (result.worker, tuple(result.kept_keys))
            return
        self.empty += 1  # dynamic sampling filtered every group of it
        if self.empty >= MAX_EMPTY_RESULTS:
            logger.warning("sentinel: %d requests at version %d came back with every group filtered; skipping "
                           "this check", self.empty, self.due)
            self._schedule(self.due + self.cfg.every_steps)

    def holds(self, version: int) -> bool:
        """Whether the learner's next step (from ``version``) must wait for the check's responses."""
        return self.due is not None and version >= self.due and self.found is None

    def start(self, buffer, learner, version: int) -> Probe | None:
        """Start the check if one is due and its responses are in: the learner scores them before its next
        step. Returns the `Probe`, or None."""
        if self.due is None or version < self.due or self.found is None:
            return None
        worker, keys = self.found
        groups_ref = buffer.peek_groups.remote(list(keys))
        return Probe(learner.probe_remote(groups_ref, version, self.cfg.num_samples), worker, version)

    def finish(self, probe: Probe, timeout_s: float) -> dict[str, float]:
        """Wait for ``probe`` (bounded), judge it, schedule the next check; returns ``sentinel/*`` metrics (one
        worker's gap: nothing to combine across workers; learner rank 0's forward).

        A check that found no token of its version (every response failed) is repeated at the next step.

        Raises:
            SentinelError: the gap exceeds a bound (one line: the worker, the version, the gap).
            TimeoutError: the learner did not answer within ``timeout_s``.
        """
        gap = wait_all(probe.refs, timeout_s, "the sentinel's learner forward")[0]
        if gap["tokens"] == 0:
            logger.warning("sentinel: no token of version %d to compare in rollout worker %d's responses; "
                           "checking again at the next step", probe.version, probe.worker)
            self._schedule(probe.version + 1)
            return {}
        self._schedule(probe.version + self.cfg.every_steps)
        check_gap(gap, probe.worker, probe.version, self.cfg)
        return {"sentinel/mean_abs_logprob_diff": gap["mean_abs_logprob_diff"],
                "sentinel/max_abs_logprob_diff": gap["max_abs_logprob_diff"],
                "sentinel/mismatch_kl": gap["mismatch_kl"], "sentinel/tokens": gap["tokens"],
                "sentinel/worker": float(probe.worker), "sentinel/seconds": gap["seconds"]}


def gap_within(gap: dict[str, float], cfg: SentinelConfig) -> bool:
    """Whether ``gap`` (`learner.sentinel.logprob_gap`'s result, nats/token) is within the bounds of ``cfg``:
    ``mean_abs_logprob_diff <= max_mean_abs_logprob_diff`` and ``mismatch_kl <= max_mismatch_kl`` (also the
    bound of a weight push's canary check, `orchestrator.weight_verify`)."""
    return gap["mean_abs_logprob_diff"] <= cfg.max_mean_abs_logprob_diff and gap["mismatch_kl"] <= cfg.max_mismatch_kl


def check_gap(gap: dict[str, float], worker: int, version: int, cfg: SentinelConfig) -> None:
    """Compare ``gap`` (`learner.sentinel.logprob_gap`'s result, nats/token) of rollout worker ``worker`` at
    policy ``version`` with the bounds of ``cfg``.

    Raises:
        SentinelError: ``mean_abs_logprob_diff`` or ``mismatch_kl`` exceeds its bound; one line naming the
            worker, the version and both numbers with their bounds.
    """
    if gap_within(gap, cfg):
        return
    d, kl = gap["mean_abs_logprob_diff"], gap["mismatch_kl"]
    raise SentinelError(
        f"sentinel: rollout worker {worker} at weights version {version}: mean |learner - engine logprob| = "
        f"{d:.4g} nats/token (bound {cfg.max_mean_abs_logprob_diff:g}), mismatch KL {kl:.4g} (bound "
        f"{cfg.max_mismatch_kl:g}) over {gap['tokens']:.0f} sampled tokens; the learner and the engine disagree: "
        "unsupported model feature, kernel bug or bad weight push; set sentinel.every_steps = 0 to skip")
