"""`RolloutGroup`: the rollout workers of a run, addressed as one, with least-loaded routing.

Workers live in numbered slots. The group can grow (`add_worker`) and shrink (`drain`, then
`retire_drained` once the worker has no request left) while a run goes on, and brings back a worker
that died (`recover`: Ray's restart, or a replacement actor in the same slot). A new or recovered
worker holds the base weights; the orchestrator pushes the current ones before it takes prompts.

Placement is decided by the caller and handed down: ``placement.strategy(slot)`` gives the Ray
scheduling strategy of a slot's actor (the orchestrator reserves a one-bundle placement group per
slot) and ``placement.release(slot)`` frees it when the slot is retired.

User code the run names by import path (reward functions, an environment class) is checked here on the
driver before any actor starts (`rollout.rewards.RewardSet` with the data's columns), and the dirs the driver
imported it from go on the workers' ``PYTHONPATH`` (`base.user_code.code_roots`): on one machine that is all
an actor needs; other nodes get the code from the job's runtime_env (``working_dir`` / ``py_modules``).

Left out on purpose: an in-process mode (tests use real actors).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from base.user_code import code_roots
from buffer import GenerateRequest, Problem
from rollout.rewards import RewardSet, reward_columns
from rollout.worker import RolloutWorker

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from base.adapter import LoraSpec
    from base.model_source import ModelSource
    from rollout.config import DataConfig, RolloutConfig


class RolloutGroup:
    """N `RolloutWorker` actors. Methods ending in ``_remote`` return ObjectRefs.

    Construction waits (bounded) until every engine is up, so a bad model dir fails here with the
    worker's error.

    Args:
        cfg: `RolloutConfig`.
        data_cfg: `DataConfig`.
        model: the model (`base.model_source.ModelSource`) or a local HF model dir every node sees.
        buffer: the name of the replay buffer actor the workers write into (a name: see `RolloutWorker`).
        placement: ``strategy(slot) -> scheduling strategy`` and ``release(slot)`` (see the module doc).
        startup_timeout_s: seconds an engine may take to come up.
        worker_cls: `RolloutWorker` or a subclass.
        lora: the workers serve LoRA adapters of this spec (`base.adapter`); None: full weights.
        env_vars: further environment variables of the workers, e.g. how they reach the run's reward-model pools
            (`rollout.reward_models.reward_models_env`).

    Raises:
        RuntimeError: a worker could not be placed or failed to start within ``startup_timeout_s``.
        ValueError: a reward function that cannot be called with the data's columns (one line naming it).
    """

    def __init__(self, cfg: RolloutConfig, data_cfg: DataConfig, model: ModelSource | str, buffer: str, placement,
                 startup_timeout_s: float = 600.0, worker_cls: type = RolloutWorker, lora: LoraSpec | None = None,
                 wait: bool = True, env_vars: dict[str, str] | None = None) -> None:
        import ray

        self.cfg, self.data_cfg, self.model, self.buffer = cfg, data_cfg, model, buffer
        self.placement, self.startup_timeout_s, self.lora = placement, startup_timeout_s, lora
        self.incarnation: dict[int, int] = {}  # slot -> times its actor was (re)started
        RewardSet(cfg.rewards, cfg.reward_timeout_s, reward_columns(data_cfg), check=worker_cls.reward_fn)
        # the engine sets vLLM's own environment for the platform it finds (rollout.engine_args.engine_env)
        env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(max(1, int(cfg.num_cpus))),
                            **(env_vars or {})}}
        roots = code_roots([r.fn for r in cfg.rewards] + [cfg.env.type])
        if roots:  # Ray ships the driver's working dir itself; a user module found elsewhere needs its dir
            env["env_vars"]["PYTHONPATH"] = os.pathsep.join([*roots, *filter(None, [os.environ.get("PYTHONPATH")])])
            logger.info("rollout workers import user code from %s", roots)
        # Ray restarts a dead worker (re-running __init__); its failed calls raise to the driver, which
        # re-issues them (no automatic task retry, so nothing runs twice behind the driver's back)
        self._actor = ray.remote(worker_cls)
        self._options = dict(num_cpus=cfg.num_cpus, num_gpus=cfg.gpus_per_worker, resources=cfg.resources,
                             max_concurrency=4, runtime_env=env, max_restarts=cfg.max_restarts, max_task_retries=0)
        self.slots = {i: self._new(i) for i in range(cfg.num_workers)}
        self.inflight = {i: 0 for i in self.slots}
        self.draining: set[int] = set()
        self._next_slot = cfg.num_workers
        if wait:
            self.wait_up()

    def wait_up(self) -> None:
        """Wait until every worker has started (its engine up), at most ``startup_timeout_s``; with
        ``wait=False`` the constructor returns as soon as the actors are created, so their start-up (vLLM's
        import and engine, ~10 s on 2 cores) overlaps the caller's other work, e.g. the learner's.

        Raises:
            RuntimeError: a worker did not start within ``startup_timeout_s``.
        """
        self._wait_up(list(self.slots))

    def _new(self, slot: int):
        """Start the actor of ``slot`` where the placement puts it."""
        self.incarnation[slot] = self.incarnation.get(slot, -1) + 1
        return self._actor.options(**self._options, scheduling_strategy=self.placement.strategy(slot)).remote(
            self.cfg, self.data_cfg, self.model, slot, self.buffer, self.lora)

    def release(self, slot: int) -> None:
        """Kill the actor of ``slot`` (if any) and free its placement."""
        import ray

        if slot in self.slots:
            ray.kill(self.slots.pop(slot))
        self.inflight.pop(slot, None)
        self.incarnation.pop(slot, None)
        self.placement.release(slot)

    def _wait_up(self, slots: list[int]) -> None:
        import ray

        try:
            ray.get([self.slots[i].get_version.remote() for i in slots], timeout=self.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"rollout worker(s) {slots} did not start within {self.startup_timeout_s:.0f} s "
                f"(each needs num_cpus={self.cfg.num_cpus}, num_gpus={self.cfg.gpus_per_worker:g}; check `ray status`)"
            ) from None

    @property
    def workers(self) -> list:
        """Actor handles of every live worker (draining ones included), in slot order."""
        return [self.slots[i] for i in sorted(self.slots)]

    @property
    def active(self) -> list[int]:
        """Slots that take new requests (live and not draining)."""
        return [i for i in sorted(self.slots) if i not in self.draining]

    def add_worker(self) -> int:
        """Start one more worker and wait until its engine is up; returns its slot.

        Raises:
            RuntimeError: it did not start within the startup timeout (it is killed again).
        """
        slot, self._next_slot = self._next_slot, self._next_slot + 1
        try:
            self.slots[slot], self.inflight[slot] = self._new(slot), 0
            self._wait_up([slot])
        except RuntimeError:
            self.release(slot)
            raise
        return slot

    def drain(self, slot: int) -> None:
        """Stop routing new requests to ``slot``; it finishes the ones it has."""
        self.draining.add(slot)

    def retire_drained(self) -> list[int]:
        """Kill drained workers with no request left; returns their slots."""
        gone = [i for i in sorted(self.draining) if self.inflight[i] == 0]
        for i in gone:
            self.release(i)
            self.draining.discard(i)
        return gone

    def recover(self, slot: int, timeout_s: float) -> str:
        """Wait until worker ``slot`` serves again after a failure; returns ``"restarted"`` (Ray restarted
        it) or ``"replaced"`` (out of restarts: a new actor takes the slot). It holds the base model
        weights (version 0) afterwards; the caller pushes the current ones.

        Raises:
            RuntimeError: neither happened within ``timeout_s``.
        """
        import ray

        try:
            ray.get(self.slots[slot].get_version.remote(), timeout=timeout_s)
            self.incarnation[slot] += 1  # Ray re-ran its __init__: a new process in the same slot
            return "restarted"
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(f"rollout worker {slot} did not come back within {timeout_s:.0f} s") from None
        except ray.exceptions.RayActorError:
            self.slots[slot] = self._new(slot)
            try:
                ray.get(self.slots[slot].get_version.remote(), timeout=timeout_s)
            except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
                raise RuntimeError(f"replacement of rollout worker {slot} failed to start: {e}") from None
            return "replaced"

    def replace(self, slot: int) -> str:
        """Kill worker ``slot`` for good (a hung worker: alive, so Ray would not restart it, and a Ray restart
        after a kill could race with calls still reaching the old process) and start a new actor in its slot;
        wait (``startup_timeout_s``) until it serves; returns ``"replaced"``. It holds the base model weights
        (version 0) afterwards; the caller pushes the current ones. Its earlier actor's calls fail with
        ``RayActorError``.

        Raises:
            RuntimeError: the new actor did not start within ``startup_timeout_s``.
        """
        import ray

        ray.kill(self.slots[slot], no_restart=True)
        self.slots[slot] = self._new(slot)
        try:
            ray.get(self.slots[slot].get_version.remote(), timeout=self.startup_timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as e:
            raise RuntimeError(f"replacement of rollout worker {slot} failed to start within "
                               f"{self.startup_timeout_s:.0f} s: {type(e).__name__}") from None
        return "replaced"

    def has_capacity(self, per_worker: int = 2) -> bool:
        """Whether some active worker has fewer than ``per_worker`` requests in flight."""
        return any(self.inflight[i] < per_worker for i in self.active)

    def least_loaded(self) -> int:
        """Active slot with the fewest requests in flight."""
        return min(self.active, key=lambda i: self.inflight[i])

    def generate_remote(self, slot: int, req: GenerateRequest):
        """Send ``req`` to worker ``slot``; returns an ObjectRef of its `RolloutResult`."""
        self.inflight[slot] += 1
        return self.slots[slot].generate.remote(req)

    def done(self, slot: int) -> None:
        """Mark one request of worker ``slot`` finished."""
        self.inflight[slot] -= 1

    def members(self) -> tuple[tuple[int, int], ...]:
        """``(slot, incarnation)`` of every live worker, in slot order: what a weight push reaches. A restarted
        worker keeps its slot and gets a new incarnation."""
        return tuple((slot, self.incarnation[slot]) for slot in sorted(self.slots))

    def receive_weights_remote(self, slot: int, version: int, buckets_ref=None):
        """Worker ``slot`` stages policy ``version``: the buckets behind ``buckets_ref`` (an ObjectRef of bucket
        bytes), or with None one push read from its weight group. Returns an ObjectRef of its receipt
        (``{"bytes", "applied", "load_seconds"}``)."""
        return self.slots[slot].receive_weights.remote(version, buckets_ref)

    def join_weight_group_remote(self, slot: int, backend: str, addr: str, port: int, rank: int, world_size: int,
                                 timeout_s: float, name: str):
        """Worker ``slot`` joins weight group ``name`` as ``rank`` (`base.weight_group.WeightGroup`); an ObjectRef."""
        return self.slots[slot].join_weight_group.remote(backend, addr, port, rank, world_size, timeout_s, name)

    def push_weights_remote(self, version: int, buckets_ref) -> list:
        """Send one weight version (an ObjectRef of bucket bytes) to every worker; returns ObjectRefs."""
        return [self.receive_weights_remote(slot, version, buckets_ref) for slot in sorted(self.slots)]

    def evaluate(self, problems: list[Problem], min_version: int, max_tokens: int, timeout_s: float) -> list[bool]:
        """Greedy held-out results (strict exact match), one per problem in ``problems``' order, split across
        active workers.

        Raises:
            ray.exceptions.GetTimeoutError: the workers did not answer within ``timeout_s`` seconds.
        """
        import ray

        ws = [self.slots[i] for i in self.active]
        k = len(ws)
        refs = [w.evaluate.remote(problems[i::k], min_version, max_tokens) for i, w in enumerate(ws)]
        results = ray.get(refs, timeout=timeout_s)
        correct = [False] * len(problems)
        for i, r in enumerate(results):
            correct[i::k] = r
        return correct

    def evaluate_pass_k(self, problems: list[Problem], pass_problems: int, k: int, min_version: int, max_tokens: int,
                        timeout_s: float) -> tuple[list[bool], list[int]]:
        """`evaluate`, and ``k`` episodes at ``rollout.temperature`` for each of the first ``pass_problems`` problems,
        sampled in the same engine calls as the greedy ones (`RolloutWorker.evaluate_pass_k`), split across active
        workers.

        Returns:
            ``(correct, counts)``: greedy correctness per problem, in ``problems``' order; for each of the first
            ``pass_problems`` problems, in order, how many of its ``k`` samples were correct (0..k).

        Raises:
            ray.exceptions.GetTimeoutError: the workers did not answer within ``timeout_s`` seconds.
        """
        import ray

        ws = [self.slots[i] for i in self.active]
        w = len(ws)
        refs = [ws[i].evaluate_pass_k.remote(problems[i::w], [j < pass_problems for j in range(i, len(problems), w)],
                                             k, min_version, max_tokens) for i in range(w)]
        results = ray.get(refs, timeout=timeout_s)
        correct, counts = [False] * len(problems), [0] * min(pass_problems, len(problems))
        for i, (c, n) in enumerate(results):
            correct[i::w] = c
            counts[i::w] = n  # worker i's sampled problems are i, i + w, ... below pass_problems
        return correct, counts
