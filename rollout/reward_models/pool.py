"""The driver's side of a reward-model pool: `RewardModelPool`, the server actors of one ``[[reward_models]]`` entry.

A pool is N `RewardModelServer` Ray actors with their own resources (``num_cpus``, ``num_gpus``, custom resources,
node labels: one placement bundle per worker, reserved by the orchestrator), grown or shrunk while a run goes on
(`RewardModelPool.add_worker` / `remove_worker`) and restarted by Ray when one dies, like the rollout workers of
`rollout.group.RolloutGroup`. It reports the servers' counters as per-step metrics ``reward_model/<name>/*``.

Left out on purpose: autoscaling the pools (the orchestrator may call `add_worker` / `remove_worker`; nothing
decides it automatically yet).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rollout.reward_models.client import _CLIENTS, _CLIENTS_LOCK, RewardModelClient
from rollout.reward_models.server import RewardModelServer
from rollout.reward_models.text import template_fields

if TYPE_CHECKING:
    from base.model_source import ModelSource

logger = logging.getLogger(__name__)


class RewardModelPool:
    """The server actors of one ``[[reward_models]]`` entry, in numbered slots (a Ray actor each, named
    ``<prefix>-<slot>``), or with ``in_process`` one server in this process (tests).

    Construction registers its client in this process (`reward_model` finds it) and, with ``wait``, waits
    (bounded) until every server has loaded its model.

    Args:
        cfg: `ClassifierRewardModelConfig` or `JudgeRewardModelConfig`.
        model: the model (`base.model_source.ModelSource`) or a local HF model dir every node sees.
        placement: ``strategy(slot)`` / ``release(slot)`` (`orchestrator.placement.SlotPlacement`); None: Ray's
            default scheduling.
        prefix: the actors' name prefix (default: ``relayrl-rm-<random>-<name>``, unique per pool).
        in_process: one server object in this process instead of actors.
        startup_timeout_s: seconds a server may take to load its model.
        wait: wait for the servers here; False: call `wait_up` later (start-ups overlap other work).

    Raises:
        RuntimeError: a server did not start within ``startup_timeout_s`` (its error named when it raised).
        ValueError: (in process) a classifier ``label`` the model lacks.
    """

    def __init__(self, cfg: Any, model: ModelSource | str, placement: Any = None, prefix: str | None = None,
                 in_process: bool = False, startup_timeout_s: float = 600.0, wait: bool = True) -> None:
        self.cfg, self.model, self.placement, self.in_process = cfg, model, placement, in_process
        self.prefix = prefix or f"relayrl-rm-{uuid.uuid4().hex[:8]}-{cfg.name}"
        self.startup_timeout_s = startup_timeout_s
        self.slots: dict[int, Any] = {}
        self._last: dict[str, float] = {}
        fields = template_fields(cfg.template) if cfg.template is not None else ()
        if in_process:
            self.slots[0] = RewardModelServer(cfg, model, 0)
            self.client = RewardModelClient(cfg.name, None, cfg.timeout_s, cfg.batch_size, fields,
                                            local=[self.slots[0]])
        else:
            import ray

            env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(max(1, int(cfg.num_cpus)))}}
            self._actor = ray.remote(RewardModelServer)
            self._options = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources,
                                 max_restarts=cfg.max_restarts, max_task_retries=0, runtime_env=env)
            for slot in range(cfg.num_workers):
                self.slots[slot] = self._new(slot)
            self.client = RewardModelClient(cfg.name, self.prefix, cfg.timeout_s, cfg.batch_size, fields)
        with _CLIENTS_LOCK:
            _CLIENTS[cfg.name] = self.client
        if wait:
            self.wait_up()

    def spec(self) -> dict[str, Any]:
        """What a caller in another process needs (`reward_model`): name, actor prefix, timeout, batch size and
        template fields."""
        return {"name": self.cfg.name, "prefix": self.prefix, "timeout_s": self.cfg.timeout_s,
                "batch_size": self.cfg.batch_size, "fields": list(self.client.fields)}

    def _new(self, slot: int):
        strategy = self.placement.strategy(slot) if self.placement is not None else None
        return self._actor.options(**self._options, name=f"{self.prefix}-{slot}", scheduling_strategy=strategy
                                   ).remote(self.cfg, self.model, slot)

    def wait_up(self, slots: Sequence[int] | None = None) -> None:
        """Wait until the servers of ``slots`` (default: all) have loaded their models.

        Raises:
            RuntimeError: one did not within ``startup_timeout_s``, or its start raised (named).
        """
        if self.in_process:
            return
        import ray

        slots = list(self.slots) if slots is None else list(slots)
        try:
            ray.get([self.slots[s].ping.remote() for s in slots], timeout=self.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"reward model {self.cfg.name!r}: server(s) {slots} did not start within "
                               f"{self.startup_timeout_s:.0f} s (each needs num_cpus={self.cfg.num_cpus:g}, "
                               f"num_gpus={self.cfg.num_gpus:g}; check `ray status`)") from None
        except ray.exceptions.RayActorError as e:
            raise RuntimeError(f"reward model {self.cfg.name!r}: a server failed to start: "
                               f"{str(e).strip().splitlines()[-1][:300]}") from None

    def add_worker(self) -> int:
        """Start one more server, wait until it is up, return its slot (callers find it within
        `RewardModelClient.refresh_s`).

        Raises:
            RuntimeError: an in-process pool, or it did not start (it is removed again).
        """
        if self.in_process:
            raise RuntimeError(f"reward model {self.cfg.name!r} runs in process: it cannot add servers")
        slot = max(self.slots, default=-1) + 1
        self.slots[slot] = self._new(slot)
        try:
            self.wait_up([slot])
        except RuntimeError:
            self.remove_worker(slot)
            raise
        return slot

    def remove_worker(self, slot: int) -> None:
        """Kill the server of ``slot`` and free its placement; calls it had in flight fail (None, counted)."""
        import ray

        actor = self.slots.pop(slot, None)
        if actor is not None and not self.in_process:
            ray.kill(actor)
        if self.placement is not None:
            self.placement.release(slot)

    def shutdown(self) -> None:
        """Remove every server and unregister the pool's client from this process."""
        for slot in list(self.slots):
            self.remove_worker(slot)
        with _CLIENTS_LOCK:
            if _CLIENTS.get(self.cfg.name) is self.client:
                del _CLIENTS[self.cfg.name]

    def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """The servers' counters (`RewardModelServer.stats`) summed over those that answered within ``timeout_s``
        (a dead or restarting server is left out, never raised), and ``workers``: how many answered."""
        if self.in_process:
            per = [s.stats() for s in self.slots.values()]
        else:
            import ray

            refs = [a.stats.remote() for a in self.slots.values()]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
            per = []
            for ref in ready:
                try:
                    per.append(ray.get(ref, timeout=0))
                except ray.exceptions.RayError as e:
                    logger.warning("reward model %r: a server did not report its stats: %s", self.cfg.name,
                                   type(e).__name__)
        total: dict[str, Any] = {k: sum(p.get(k, 0) for p in per) for k in (
            "items", "batches", "unscored", "errors", "expired", "aborted", "queued", "engine_unfinished", "seconds")}
        total["workers"] = len(per)
        total["last_error"] = next((p["last_error"] for p in per if p["last_error"]), "")
        total["last_unparsed"] = next((p["last_unparsed"] for p in per if p["last_unparsed"]), "")
        return total

    def metrics(self, timeout_s: float = 10.0) -> dict[str, float]:
        """Per-step metrics ``reward_model/<name>/*`` since the previous call, summed over the servers: ``items``
        scored, ``failed_items`` (None: batch errors, no verdict, skipped after the caller's timeout),
        ``mean_batch_size`` (items per batch), ``seconds_per_item`` (server time), ``workers`` (servers that
        answered within ``timeout_s``). A restarted server's counters start again from 0 (its earlier ones are
        not subtracted)."""
        now = self.stats(timeout_s)
        delta = {k: now[k] - self._last.get(k, 0) if now[k] >= self._last.get(k, 0) else now[k]
                 for k in ("items", "batches", "unscored", "expired", "seconds")}
        self._last = {k: now[k] for k in delta}
        p = f"reward_model/{self.cfg.name}/"
        return {p + "items": float(delta["items"]), p + "failed_items": float(delta["unscored"] + delta["expired"]),
                p + "mean_batch_size": delta["items"] / delta["batches"] if delta["batches"] else 0.0,
                p + "seconds_per_item": delta["seconds"] / delta["items"] if delta["items"] else 0.0,
                p + "workers": float(now["workers"])}
