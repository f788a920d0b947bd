"""Rollout requests: admission, routing, per-request timeouts, collection and worker recovery.

`Dispatcher` turns the admission budget of `buffer.StalenessManager` into `GenerateRequest` s (prompts
from the prompt sampler, group sizes from the rollout allocator), sends each to the least-loaded
rollout worker, and collects the `RolloutResult` s: groups the buffer kept count against the budget,
rewards feed the sampler, counters go to the `RolloutTally`. A worker that died is recovered
(`orchestrator.scaling.Scaler.recover`) and the groups of its request that never reached the buffer
are re-issued, so none is lost or duplicated.

Each request's clock starts once the weights it needs (``min_version``) exist, and it must finish
within ``rollout.request_timeout_s`` of that, whatever else finishes meanwhile.

A hung worker costs that worker, not the run: a request past its timeout, or one its worker refused with
`rollout.episode.HungWorkerError` (too many environment calls abandoned past ``rollout.env.step_timeout_s``),
gets the worker killed and replaced by a new actor in its slot, given the current weights, and its requests
re-issued as for a dead worker (``rollout/worker_restarts`` and ``rollout/worker_restarts_hung``). A slot may
be restarted so ``rollout.max_restarts`` times; one more hang stops the run naming the worker and the cause.

Left out on purpose: waiting for a hung worker to come back by itself (its request is lost time either way).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from buffer import GenerateRequest, RolloutResult
from rollout import HungWorkerError

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
        self.hung_restarts: dict[int, int] = {}  # slot -> times its worker was restarted because it hung

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

        A request past ``rollout.request_timeout_s`` gets its worker restarted and is re-issued (`restart_hung`).

        Raises:
            TimeoutError: the learner step ran past its deadline; nothing to wait for at all (a bug).
            RuntimeError: a timed-out request's worker has no restart left (`restart_hung`).
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
        for ref, f in list(self.requests.items()):
            if ref in self.requests and f.started is not None and now > f.started + rc.request_timeout_s \
                    and not ray.wait([ref], timeout=0)[0]:
                self._finished(ref)
                self.restart_hung(f, TimeoutError(
                    f"generate request {f.req.keys[0]}..{f.req.keys[-1]} ({len(f.req.keys)} groups) did not finish "
                    f"within rollout.request_timeout_s = {rc.request_timeout_s:g} s"))
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
            RuntimeError: the reward-failure budget or the dynamic-sampling refill limit was exceeded; a hung
                worker has no restart left (`restart_hung`).
        """
        import ray

        if not self.requests:
            return
        finished, _ = ray.wait(list(self.requests), num_returns=len(self.requests), timeout=0)
        for ref in finished:
            if ref not in self.requests:  # re-issued by a restart earlier in this loop
                continue
            f = self._finished(ref)
            try:
                result: RolloutResult = ray.get(ref)  # re-raises a worker's error here, in the main loop
            except ray.exceptions.RayActorError as e:  # the worker process died: recover it, retry the prompts
                self._recover(f, e)
                continue
            except HungWorkerError as e:  # the worker holds too many hung environment calls: restart it
                self.restart_hung(f, getattr(e, "cause", None) or e)
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

    def _finished(self, ref) -> InFlight:
        """Forget request ``ref`` (finished, failed or given up); returns it."""
        f = self.requests.pop(ref)
        self.rollout.done(f.worker)
        self.staleness.returned(len(f.req.keys))
        return f

    def restart_hung(self, f: InFlight, cause: Exception) -> None:
        """The worker of ``f`` hung (``cause``: a request past its timeout, or `HungWorkerError`): replace it with a
        new actor in its slot, give it the current weights and re-issue ``f``'s groups (its other requests fail and
        are re-issued as they are collected). Counted in ``rollout/worker_restarts_hung``. Nothing happens when
        that worker was restarted since ``f`` was sent (``f`` is then re-issued as a dead worker's request).

        Raises:
            RuntimeError: the slot was already restarted ``rollout.max_restarts`` times for hangs; names the worker
                and the cause.
        """
        slot, limit = f.worker, self.cfg.rollout.max_restarts
        if self.rollout.incarnation.get(slot) == f.incarnation:
            n = self.hung_restarts.get(slot, 0)
            if n >= limit:
                raise RuntimeError(f"rollout worker {slot} hung: {cause} (it was restarted for hangs {n} times, "
                                   f"rollout.max_restarts = {limit}); find what hangs in its log, or raise the "
                                   "timeout or rollout.max_restarts")
            self.hung_restarts[slot] = n + 1
            self.tally.worker_restarts_hung += 1
            logger.warning("rollout worker %d hung: %s; restarting it", slot, cause)
        self._recover(f, cause, replace=True)

    def _recover(self, f: InFlight, err: Exception, replace: bool = False) -> None:
        """Bring back the dead (or, with ``replace``, hung) worker of ``f`` and re-issue its groups that never
        reached the buffer.

        A worker dies with every request it held: the first failure recovers it, the others (sent to
        the same, earlier incarnation) are only re-issued.
        """
        import ray

        if self.rollout.incarnation.get(f.worker) == f.incarnation:
            how = self.scaler.recover(f.worker, self.staleness.version, err, replace=replace)
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

