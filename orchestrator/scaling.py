"""Rollout scaling: manual (`relayrl scale`), automatic (on the learner's wait for data) and worker recovery.

All three change the rollout group while the run goes on, and all three end the same way: a new or
restarted worker gets the current weights (`WeightSync.bring_to_current`) before it takes prompts,
and the weight sync learns that membership changed.

- Manual: the run's `RunControl` actor holds the desired worker count; `Scaler.apply` polls it about
  once a second, adds workers while the cluster has room, drains surplus ones (they finish their
  requests, then are killed) so no prompt is lost.
- Automatic (``rollout.autoscale_max_workers > 0``): `Scaler.autoscale` asks the same control actor
  for one worker more after ``autoscale_patience`` steps in a row in which the learner waited on data
  for more than ``autoscale_wait_frac`` of the step, one fewer (not below ``rollout.num_workers``)
  after as many steps in which it waited under a tenth of that.
- Recovery: `Scaler.recover` brings a dead worker back (Ray's restart or a replacement actor).
- Reward-model pools (``[[reward_models]]``): `Scaler.apply` also matches each pool's server count to what the
  control actor holds for it (``relayrl scale RUN --reward-model NAME=N``): servers are added (started and
  waited for) or removed (killed; callers resend their in-flight items to another server,
  `rollout.reward_models.client`).

Left out on purpose: scaling the learner (a dead learner rank ends the run; resume from a checkpoint).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rollout.config import RolloutConfig


class Scaler:
    """Matches the rollout group to what was asked for, and recovers dead workers.

    Args:
        cfg: `RolloutConfig`.
        rollout: the `RolloutGroup`.
        control: the run's `RunControl` actor handle.
        weight_sync: the run's `WeightSync`.
        reward_models: the run's `rollout.reward_models.RewardModelPool` s.
    """

    def __init__(self, cfg: RolloutConfig, rollout, control, weight_sync, reward_models=()) -> None:
        self.cfg, self.rollout, self.control, self.weight_sync = cfg, rollout, control, weight_sync
        self.reward_models = list(reward_models)
        self.next_poll = 0.0  # monotonic seconds of the next control poll
        self.wait_history: list[float] = []  # learner wait fraction of the last steps

    def apply(self, version: int) -> None:
        """About once a second: add or drain workers to match the desired count.

        Raises:
            TimeoutError: the control actor or a weight push did not answer in time.
        """
        import ray

        from orchestrator.placement import bundle

        now = time.monotonic()
        if now < self.next_poll:
            return
        self.next_poll = now + 1.0
        rc, want = self.cfg, ray.get(self.control.desired.remote(), timeout=30)
        while len(self.rollout.active) < want:
            free, need = ray.available_resources(), bundle(rc.num_cpus, rc.gpus_per_worker, rc.resources)
            if any(free.get(k, 0.0) + 1e-9 < v for k, v in need.items()):
                logger.warning("scale to %d rollout workers: the cluster has no room for another (needs %s; free %s)",
                               want, need, free)
                break
            try:
                slot = self.rollout.add_worker()
            except RuntimeError as e:  # could not be placed or started: keep running with what we have
                logger.warning("scale to %d rollout workers: %s", want, e)
                break
            self.weight_sync.bring_to_current(slot, version, f"new rollout worker {slot}")
            logger.info("rollout worker %d added at policy version %d", slot, version)
        active = self.rollout.active
        for slot in sorted(active, reverse=True)[: max(0, len(active) - want)]:
            self.rollout.drain(slot)
            logger.info("rollout worker %d draining", slot)
        for slot in self.rollout.retire_drained():
            logger.info("rollout worker %d removed", slot)
        if self.reward_models:
            wanted = ray.get(self.control.desired_reward_models.remote(), timeout=30)
            for pool in self.reward_models:
                scale_pool(pool, wanted.get(pool.cfg.name, len(pool.slots)))
        self.control.report.remote({"rollout_workers": len(self.rollout.active), "version": version,
                                    **({"reward_model_workers": {p.cfg.name: len(p.slots) for p in self.reward_models}}
                                       if self.reward_models else {})})

    def autoscale(self, wait_frac: float) -> None:
        """Record the step's learner wait fraction; ask for one worker more or fewer when it says so."""
        import ray

        rc = self.cfg
        if not rc.autoscale_max_workers:
            return
        self.wait_history = (self.wait_history + [wait_frac])[-rc.autoscale_patience:]
        if len(self.wait_history) < rc.autoscale_patience:
            return
        n = len(self.rollout.active)
        if min(self.wait_history) > rc.autoscale_wait_frac and n < rc.autoscale_max_workers:
            want = n + 1
        elif max(self.wait_history) < rc.autoscale_wait_frac / 10 and n > rc.num_workers:
            want = n - 1
        else:
            return
        logger.info("autoscale: learner waited %s of the last steps; rollout workers %d -> %d",
                    ", ".join(f"{w:.0%}" for w in self.wait_history), n, want)
        ray.get(self.control.request_scale.remote(want), timeout=30)
        self.wait_history, self.next_poll = [], 0.0  # judge the new size afresh; apply it now

    def recover(self, slot: int, version: int, err: Exception, replace: bool = False) -> str:
        """Bring dead worker ``slot`` back (with ``replace``: kill the hung worker and start a new one in its slot,
        `RolloutGroup.replace`) and give it the weights of ``version``; returns ``"restarted"`` or ``"replaced"``.

        Raises:
            RuntimeError: it did not come back within ``rollout.request_timeout_s`` (a replacement: within the
                group's start-up timeout).
            TimeoutError: the weight push to it did not finish in time.
        """
        logger.warning("rollout worker %d %s (%s); recovering it", slot, "hung" if replace else "died",
                       type(err).__name__)
        how = self.rollout.replace(slot) if replace else self.rollout.recover(slot, self.cfg.request_timeout_s)
        self.weight_sync.bring_to_current(slot, version, f"recovered rollout worker {slot}")
        return how


def scale_pool(pool, want: int) -> None:
    """Add servers to reward-model ``pool`` (`rollout.reward_models.RewardModelPool`) while it has fewer than
    ``want`` and the cluster has room (each waited for until it is up), or remove its highest slots down to ``want``.
    A server that cannot be placed or started is logged and the run goes on with those it has."""
    import ray

    from orchestrator.placement import reward_model_bundle

    c = pool.cfg
    while len(pool.slots) < want:
        free, need = ray.available_resources(), reward_model_bundle(c)
        if any(free.get(k, 0.0) + 1e-9 < v for k, v in need.items()):
            logger.warning("scale reward model %r to %d servers: the cluster has no room for another (needs %s; "
                           "free %s)", c.name, want, need, free)
            return
        try:
            slot = pool.add_worker()
        except RuntimeError as e:
            logger.warning("scale reward model %r to %d servers: %s", c.name, want, e)
            return
        logger.info("reward model %r: server %d added (%d now)", c.name, slot, len(pool.slots))
    for slot in sorted(pool.slots, reverse=True)[: max(0, len(pool.slots) - want)]:
        pool.remove_worker(slot)
        logger.info("reward model %r: server %d removed (%d now)", c.name, slot, len(pool.slots))
