"""Canary checks of weight pushes: does a rollout worker serve the weights the learner pushed?

A checksum (`base.weight_buckets.verify_checksums`, on the worker, before it loads) proves the bytes arrived
as sent; it cannot see weights that load wrong (a loader or kernel bug, a tensor left stale) or bytes that were
wrong where they were made. So every ``weights.verify_every`` policy versions, once a worker has applied a push
(it applies staged weights lazily between requests), it scores a fixed canary sequence (`CANARY_TEXT`, at most
`CANARY_TOKENS` tokens, `rollout.RolloutWorker.score_canary`) and the driver compares those logprobs with the
learner's for the same version (`learner.LearnerGroup.sequence_logprobs_remote`, one forward per version on
every rank, submitted right after the export so it runs with the exported weights). The comparison and its bounds
are the run-time sentinel's (`learner.sentinel.logprob_gap`, `orchestrator.sentinel.gap_within`: by default
0.15 nats/token mean |diff| and 0.01 mismatch KL): a bf16 engine against an fp32 learner differs by ~1e-2
nats/token, a corrupted tensor by far more than 1.

`CanaryChecks` only runs the checks and judges them; what to do with a worker that fails (push again, then
replace it) is `orchestrator.weight_sync.WeightSync`'s.

Left out on purpose: holding back the samples a worker generates between applying bad weights and failing its
check (the sentinel and the importance weights see those), and checking the prefill path of long prompts.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from orchestrator.remote import wait_all
from orchestrator.sentinel import gap_within

if TYPE_CHECKING:
    from orchestrator.config import SentinelConfig

logger = logging.getLogger(__name__)

CANARY_TEXT = ("The quick brown fox jumps over the lazy dog. Then 12 + 30 = 42, and the answer is 42. "
               "A short, fixed text that every tokenizer splits into a few dozen tokens.")
"""The canary: scored by the learner and by every worker after a push (first token as the prompt)."""

CANARY_TOKENS = 32
"""Tokens of `CANARY_TEXT` scored (the first is the prompt): one short forward on each side."""

KEEP_VERSIONS = 8
"""Learner canaries kept, newest versions (a check of an older version than these is skipped)."""


@dataclass
class Check:
    """A canary check in flight: worker ``slot`` (its ``incarnation``) scores the canary at ``version`` or newer."""

    slot: int
    incarnation: int
    version: int
    ref: Any
    deadline: float  # monotonic s


@dataclass
class Verdict:
    """A finished check: ``ok`` True (within bounds), False (failed, ``why`` says how) or None (not compared:
    the worker died, or a newer version it served had no learner canary)."""

    slot: int
    incarnation: int
    version: int
    ok: bool | None
    why: str = ""


def canary_gap(learner_lp: list[float], engine_lp: list[float]) -> dict[str, float]:
    """`learner.sentinel.logprob_gap` of one canary: learner against engine logprobs of the same tokens (nats),
    every token compared.

    Raises:
        ValueError: the two lists differ in length.
    """
    import torch

    from learner.sentinel import logprob_gap

    if len(learner_lp) != len(engine_lp):
        raise ValueError(f"canary: the learner scored {len(learner_lp)} tokens, the engine {len(engine_lp)}")
    a, b = torch.tensor([learner_lp], dtype=torch.float64), torch.tensor([engine_lp], dtype=torch.float64)
    return logprob_gap(a, b, torch.ones_like(a))


class CanaryChecks:
    """Runs canary checks: the learner's canary per version, the workers' checks, their verdicts.

    Args:
        every: check every ``every``-th policy version (``weights.verify_every`` >= 1).
        bounds: the sentinel's bounds (``[sentinel]``: ``max_mean_abs_logprob_diff``, ``max_mismatch_kl``).
        learner: the `LearnerGroup`.
        rollout: the `RolloutGroup`.
        timeout_s: a check must finish within this many seconds of its start (``weights.push_timeout_s``).
    """

    def __init__(self, every: int, bounds: SentinelConfig, learner: Any, rollout: Any, timeout_s: float) -> None:
        if every < 1:
            raise ValueError(f"canary checks every {every} versions: give weights.verify_every >= 1 (0 turns them off)")
        self.every, self.bounds, self.learner, self.rollout, self.timeout_s = every, bounds, learner, rollout, timeout_s
        self.ids: list[int] | None = None  # the canary's token ids, from a worker's tokenizer on first use
        self.expected: dict[int, list] = {}  # version -> the learner's canary refs (rank 0's holds the logprobs)
        self.checks: list[Check] = []
        self.passed, self.seconds, self.max_diff = 0, 0.0, 0.0  # metrics: totals / since the last `metrics`
        self.run_seconds, self.run_max_diff = 0.0, 0.0  # the same over the whole run

    def due(self, version: int) -> bool:
        """Whether a push of ``version`` is checked (every ``every``-th; version 0 is the base model, never pushed)."""
        return version > 0 and version % self.every == 0

    def tokens(self) -> list[int]:
        """The canary's token ids, tokenized by the first worker on the first call (waits, bounded).

        Raises:
            TimeoutError: the worker did not answer within the timeout.
            RuntimeError: the canary text gives fewer than 2 tokens.
        """
        if self.ids is None:
            worker = self.rollout.workers[0]
            self.ids = wait_all([worker.canary_tokens.remote(CANARY_TEXT, CANARY_TOKENS)], self.timeout_s,
                                "the canary's tokenization")[0]
            if len(self.ids) < 2:
                raise RuntimeError(f"the canary text tokenizes to {len(self.ids)} token(s); weight checks need 2 or "
                                   "more: set weights.verify_every = 0")
        return self.ids

    def expect(self, version: int) -> None:
        """Start the learner's canary forward for ``version``, once per version. Call it right after submitting the
        export of ``version``: the ranks run it next, with those weights."""
        if version not in self.expected:
            self.expected[version] = self.learner.sequence_logprobs_remote(self.tokens(), 1)
            for v in sorted(self.expected)[:-KEEP_VERSIONS]:
                del self.expected[v]

    def start(self, slot: int, version: int) -> None:
        """Start worker ``slot``'s canary check of ``version`` (it scores once it applied that version or newer)."""
        if slot not in self.rollout.slots:
            return
        ref = self.rollout.slots[slot].score_canary.remote(self.tokens(), 1, version)
        self.checks.append(Check(slot, self.rollout.incarnation[slot], version, ref, time.monotonic() + self.timeout_s))

    def refs(self) -> list:
        """ObjectRefs of the checks in flight."""
        return [c.ref for c in self.checks]

    def poll(self) -> list[Verdict]:
        """Judge the checks that finished; returns their verdicts.

        Raises:
            TimeoutError: a check is past its deadline (names the worker and the version).
        """
        import ray

        done, out = set(ray.wait(self.refs(), num_returns=len(self.checks), timeout=0)[0]) if self.checks else set(), []
        still = []
        for c in self.checks:
            if c.ref in done:
                out.append(self._judge(c))
            elif time.monotonic() > c.deadline:
                raise TimeoutError(f"rollout worker {c.slot} did not score the weight-push canary of policy version "
                                   f"{c.version} within weights.push_timeout_s = {self.timeout_s:.0f} s")
            else:
                still.append(c)
        self.checks = still
        return out

    def _judge(self, c: Check) -> Verdict:
        import ray

        try:
            got = ray.get(c.ref)
        except ray.exceptions.RayActorError:  # died or replaced: recovery brings it current
            return Verdict(c.slot, c.incarnation, c.version, None, "worker gone")
        except ray.exceptions.RayTaskError as e:  # e.g. the weights never came within weight_wait_timeout_s
            cause = str(getattr(e, "cause", None) or e).splitlines()[0]
            return Verdict(c.slot, c.incarnation, c.version, False, f"its canary call failed: {cause}")
        v = got["version"]
        self.seconds += got["seconds"]
        self.run_seconds += got["seconds"]
        if v not in self.expected:
            logger.info("rollout worker %d serves version %d by its canary check of version %d; no learner canary "
                        "of %d: not compared", c.slot, v, c.version, v)
            return Verdict(c.slot, c.incarnation, v, None, "no learner canary")
        learner_lp = wait_all([self.expected[v][0]], self.timeout_s, f"the learner's canary of version {v}")[0]
        gap = canary_gap(learner_lp, got["logprobs"])
        self.max_diff = max(self.max_diff, gap["mean_abs_logprob_diff"])
        self.run_max_diff = max(self.run_max_diff, gap["mean_abs_logprob_diff"])
        if gap_within(gap, self.bounds):
            self.passed += 1
            return Verdict(c.slot, c.incarnation, v, True)
        return Verdict(c.slot, c.incarnation, v, False, (
            f"canary mean |learner - engine logprob| = {gap['mean_abs_logprob_diff']:.4g} nats/token (bound "
            f"{self.bounds.max_mean_abs_logprob_diff:g}), mismatch KL {gap['mismatch_kl']:.4g} (bound "
            f"{self.bounds.max_mismatch_kl:g}) over {gap['tokens']:.0f} tokens"))

    def metrics(self, run: bool = False) -> dict[str, float]:
        """``weights/verified_total`` (checks passed, run total), ``weights/verify_seconds`` (seconds workers spent
        scoring canaries since the last call, summed over workers) and ``weights/verify_max_abs_logprob_diff``
        (largest mean |diff| of a check since the last call, nats/token, max over workers); with ``run``, the
        last two over the whole run (a run's summary), and the since-last-call values are left as they are."""
        if run:
            return {"weights/verified_total": float(self.passed), "weights/verify_seconds": self.run_seconds,
                    "weights/verify_max_abs_logprob_diff": self.run_max_diff}
        out = {"weights/verified_total": float(self.passed), "weights/verify_seconds": self.seconds,
               "weights/verify_max_abs_logprob_diff": self.max_diff}
        self.seconds, self.max_diff = 0.0, 0.0
        return out
