"""Rollout requests: admission, routing, per-request timeouts, collection and worker recovery.

`Dispatcher` turns the admission budget of `buffer.StalenessManager` into `GenerateRequest` s (prompts
from the prompt sampler, group sizes from the rollout allocator), sends each to the least-loaded
rollout worker, and collects the `RolloutResult` s: groups the buffer kept count against the budget,
rewards feed the sampler, counters go to the `RolloutTally`. A worker that died is recovered
(`orchestrator.scaling.Scaler.recover`) and the groups of its request that never reached the buffer
are re-issued, so none is lost or duplicated.

Each request's clock starts once the weights it needs (``min_version``) exist, and it must finish
within ``rollout.request_timeout_s`` of that, whatever else finishes meanwhile.

Left out on purpose: retrying a request that timed out (the run stops and names it).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from buffer import GenerateRequest, RolloutResult

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from orchestrator.config import RunConfig


@dataclass
class InFlight:
    """A generate request sent to worker ``worker`` (its ``incarnation``, i.e. which start of the actor in
    that slot); its clock starts once its weights exist."""

    req: GenerateRequest
    worker: int
    incarnation: int
    started: float | None  # monotonic seconds; None while it waits for policy version req.min_version


class Dispatcher:
    """The generate requests of a run, from admission to collection.

    Args:
        cfg: `RunConfig`.
        rollout: the `RolloutGroup`.
        buffer: the replay buffer actor.
        staleness, tally, scaler: the run's `StalenessManager`, `RolloutTally`, `Scaler`.
        sampler, allocator: the prompt sampler and the `RolloutAllocator`.
        sentinel: the run's `orchestrator.sentinel.Sentinel`, shown every collected result; None: none.
    """

    def __init__(self, cfg: RunConfig, rollout, buffer, staleness, tally, scaler, sampler, allocator,
                 sentinel=None) -> None:
        self.cfg, self.rollout, self.buffer, self.sentinel = cfg, rollout, buffer, sentinel
        self.staleness, self.tally, self.scaler, self.sampler, self.allocator = staleness, tally, scaler, sampler, allocator
        self.requests: dict = {}  # ObjectRef of a RolloutResult -> InFlight

    def dispatch(self) -> None:
        """Send prompts while admission control allows (at most 2 requests per worker in flight)."""
        cfg = self.cfg
        while self.staleness.capacity() > 0 and self.rollout.has_capacity(2):
            seed = cfg.seed * 100003 + self.staleness.dispatched
            keys, min_version = self.staleness.admit(cfg.rollout.prompts_per_request)
            problems, sizes = self.allocator.take(self.sampler, len(keys))
            self.send(GenerateRequest(problems, keys, sizes, min_version, seed))

    def send(self, req: GenerateRequest) -> None:
        """Send ``req`` to the least-loaded worker and remember it until it is collected."""
        slot = self.rollout.least_loaded()
        started = time.monotonic() if req.min_version <= self.staleness.version else None
        incarnation = self.rollout.incarnation[slot]
        self.requests[self.rollout.generate_remote(slot, req)] = InFlight(req, slot, incarnation, started)
        self.staleness.sent(len(req.keys))

    def wait(self, step_refs: list, step_deadline: float | None) -> None:
        """Wait until a generate request or the learner step (``step_refs``) finishes, bounded by the
        requests' deadlines and ``step_deadline`` (monotonic seconds).

        Raises:
            TimeoutError: a request ran past ``rollout.request_timeout_s`` (named) or the learner step
                past its deadline; nothing to wait for at all (a bug).
        """
        import ray

        rc, now = self.cfg.rollout, time.monotonic()
        deadlines = [f.started + rc.request_timeout_s for f in self.requests.values() if f.started is not None]
        deadlines.append(step_deadline if step_deadline is not None else now + rc.request_timeout_s)
        refs = list(self.requests) + step_refs
        if not refs:
            raise TimeoutError("nothing to wait for: no generate request in flight and no learner step running "
                               f"(admission capacity {self.staleness.capacity()}, rollout workers "
                               f"{self.rollout.active}); this is a bug, please report it")
        ray.wait(refs, num_returns=1, timeout=max(0.0, min(deadlines) - now))
        now = time.monotonic()
        for ref, f in self.requests.items():
            if f.started is not None and now > f.started + rc.request_timeout_s and not ray.wait([ref], timeout=0)[0]:
                raise TimeoutError(
                    f"generate request {f.req.keys[0]}..{f.req.keys[-1]} ({len(f.req.keys)} groups) on rollout worker "
                    f"{f.worker} did not finish within rollout.request_timeout_s = {rc.request_timeout_s:g} s while "
                    "other work went on; check that worker's log, or raise the timeout")
        if step_deadline is not None and now > step_deadline and \
                ray.wait(step_refs, num_returns=len(step_refs), timeout=0)[1]:
            raise TimeoutError(f"learner step {self.staleness.version + 1} did not finish within "
                               f"learner.step_timeout_s = {self.cfg.learner.step_timeout_s:g} s")

    def start_clocks(self) -> None:
        """The policy version advanced: requests whose weights now exist start their timeout clock."""
        for f in self.requests.values():
            if f.started is None and f.req.min_version <= self.staleness.version:
                f.started = time.monotonic()

    def collect(self) -> None:
        """Account finished generate requests; recover a worker that died; feed rewards to the sampler.

        Raises:
            RuntimeError: the reward-failure budget or the dynamic-sampling refill limit was exceeded.
        """
        import ray

        if not self.requests:
            return
        finished, _ = ray.wait(list(self.requests), num_returns=len(self.requests), timeout=0)
        for ref in finished:
            f = self.requests.pop(ref)
            self.rollout.done(f.worker)
            self.staleness.returned(len(f.req.keys))
            try:
                result: RolloutResult = ray.get(ref)  # re-raises a worker's error here, in the main loop
            except ray.exceptions.RayActorError as e:  # the worker process died: recover it, retry the prompts
                self._recover(f, e)
                continue
            for key in result.kept_keys:
                self.staleness.kept_group(key)
            if self.sentinel is not None:
                self.sentinel.saw(f.req.min_version, result)
            for prompt_id, rewards in result.group_rewards:
                self.sampler.update(prompt_id, list(rewards))
            self.tally.add(result)
        self.tally.check_reward_failures(self.staleness.version)
        self._check_refill()

    def _check_refill(self) -> None:
        """Dynamic sampling must find a batch's worth of groups with signal in bounded time.

        Raises:
            RuntimeError: more than ``max_refill_factor * prompts_per_step`` groups generated since the
                last step without filling a batch.
        """
        bc, P, t = self.cfg.buffer, self.cfg.prompts_per_step, self.tally
        if bc.dynamic_sampling and t.groups > bc.max_refill_factor * P and self.staleness.ready < P:
            raise RuntimeError(
                f"dynamic sampling generated {t.groups} groups since the last step and kept only "
                f"{self.staleness.ready} of the {P} needed ({t.zero_variance} had all-equal rewards): the "
                "prompts are all solved or all failed by this policy. Change the data, or raise "
                f"buffer.max_refill_factor (now {bc.max_refill_factor:g})")

    def _recover(self, f: InFlight, err: Exception) -> None:
        """Bring back the dead worker of ``f`` and re-issue its groups that never reached the buffer.

        A worker dies with every request it held: the first failure recovers it, the others (sent to
        the same, earlier incarnation) are only re-issued.
        """
        import ray

        if self.rollout.incarnation.get(f.worker) == f.incarnation:
            how = self.scaler.recover(f.worker, self.staleness.version, err)
            self.tally.worker_restarts += 1
        else:
            how = "already recovered"
        held, taken = ray.get(self.buffer.group_ids.remote(), timeout=60)
        todo = self.remaining(f.req, held | taken)  # groups written just before the worker died count as kept
        if todo:
            self.send(todo)
        n = len(todo.keys) if todo else 0
        self.tally.retried_groups += n
        logger.warning("rollout worker %d %s; %d groups re-issued", f.worker, how, n)

    def remaining(self, req: GenerateRequest, done: set[str]) -> GenerateRequest | None:
        """Count the groups of ``req`` in ``done`` (they reached the buffer or were trained) as kept;
        return the request for the others, None when none is left. Used on worker recovery and resume."""
        for key in set(req.keys) & done:
            self.staleness.kept_group(key)
        return req.without(done)

