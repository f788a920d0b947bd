"""The training loop: generation and training run at the same time, bounded in staleness.

Admission control (AReaL's staleness manager): a new group is dispatched only while
``groups_dispatched < (max_staleness + version + 1) * prompts_per_step``. Group number ``d`` (0-based,
FIFO) is trained at step ``d // prompts_per_step`` or earlier, so it must be generated with policy
version ``>= d // prompts_per_step - max_staleness``; the request says so (``min_version``) and the
worker waits for those weights. Hence no sample ever exceeds the bound; the buffer's drop is only
a backstop. ``max_staleness = 0`` is the synchronous on-policy schedule through the same code.

Curation: prompts come from a `buffer.prompt_sampler` fed with every group's rewards; with dynamic
sampling the buffer drops zero-variance groups and admission control refills their slots.

Checkpoints (`orchestrator.checkpoint`) are written after a step when ``checkpoint.every`` says so;
a resumed run re-issues the prompts that were in flight.

A rollout worker that dies is recovered, given the current weights, and its unfinished prompts are
re-issued; reward failures and skipped (non-finite) optimizer steps are counted and bounded.

Left out on purpose: recovery of learner ranks (a dead rank ends the run; resume from a checkpoint).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)


def check_resources(cfg, cluster: dict[str, float]) -> None:
    """Fail fast when the cluster cannot host the run's actors (Ray would wait silently forever).

    Custom resources (``learner.resources``, ``rollout.resources``) count like CPUs and GPUs; node
    labels are checked when the placement groups are reserved (`orchestrator.placement`).

    Raises:
        RuntimeError: naming the resource, how much the config asks for and how much exists.
    """
    from orchestrator.placement import bundle

    lc, rc = cfg.learner, cfg.rollout
    per_rank, per_worker = bundle(lc.num_cpus, lc.num_gpus, lc.resources), bundle(rc.num_cpus, rc.num_gpus, rc.resources)
    for res in sorted(set(per_rank) | set(per_worker)):
        a, b = per_rank.get(res, 0.0), per_worker.get(res, 0.0)
        amount = lc.num_learners * a + rc.num_workers * b
        if amount > cluster.get(res, 0.0) + 1e-9:
            raise RuntimeError(
                f"the run needs {amount:g} {res} (learner: {lc.num_learners} x {a:g}, rollout: {rc.num_workers} x "
                f"{b:g}) but the Ray cluster has {cluster.get(res, 0.0):g}; lower the learner/rollout resource "
                "spec or add nodes that have it"
            )


def _wait(refs: list, timeout: float, what: str):
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if len(ready) < len(refs):
        raise TimeoutError(f"{what} did not finish within {timeout:.0f} s")
    return ray.get(refs)


class Trainer:
    """Owns the actors of one run (buffer, learner group, rollout group) and runs the loop.

    Construction starts every actor and waits until they are up; `run` trains; the actors stay
    alive afterwards so callers (tests, benchmarks) can inspect them. ``learner_worker_cls`` /
    ``rollout_worker_cls`` substitute subclasses of the real workers (e.g. deliberately slowed ones).

    Raises:
        RuntimeError: the cluster cannot host the actors.
    """

    def __init__(self, cfg, run_dir: Path, model_path: str, train_problems: list, eval_problems: list,
                 learner_worker_cls: type | None = None, rollout_worker_cls: type | None = None,
                 resume_from: Path | None = None) -> None:
        import ray

        from buffer import PROMPT_SAMPLERS, ReplayBuffer
        from buffer.allocation import RolloutAllocator
        from learner.group import LearnerGroup
        from learner.worker import LearnerWorker
        from orchestrator.control import start_control
        from rollout.group import RolloutGroup
        from rollout.worker import RolloutWorker

        self.cfg, self.run_dir, self.eval_problems = cfg, Path(run_dir), eval_problems
        check_resources(cfg, ray.cluster_resources())
        bc = cfg.buffer
        self.buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote(
            bc.max_staleness, dynamic_sampling=bc.dynamic_sampling,
            value_tracker_discount=bc.value_tracker_discount if bc.value_tracker else None,
            prioritized=bc.prioritized_replay)
        self.learner = LearnerGroup(cfg.learner, model_path, cfg.samples_per_step, cfg.rollout.max_tokens,
                                    cfg.rollout.temperature, cfg.seed,
                                    worker_cls=learner_worker_cls or LearnerWorker,
                                    placement_timeout_s=cfg.ray.placement_timeout_s)
        self.rollout = RolloutGroup(cfg.rollout, cfg.data, model_path, self.buffer,
                                    worker_cls=rollout_worker_cls or RolloutWorker,
                                    placement_timeout_s=cfg.ray.placement_timeout_s)
        self.sampler = PROMPT_SAMPLERS[bc.prompt_sampler](train_problems, cfg.seed, group_size=cfg.rollout.group_size,
                                                           floor=bc.sampler_floor)
        self.allocator = RolloutAllocator(bc.rollout_allocation, cfg.rollout.group_size, cfg.prompts_per_step,
                                          bc.allocation_min_n, bc.allocation_max_n)
        self.control = start_control(self.run_dir.name, cfg.rollout.num_workers)
        self._next_control_poll = 0.0
        self.version = 0
        # groups: dispatched (ids), kept by the buffer, in flight, ready to train; inflight: ref -> request
        self.dispatched, self.kept, self.inflight_groups, self.ready_groups = 0, 0, 0, 0
        self.inflight, self.pushes, self.reissue = {}, [], []
        self.collected: set[str] = set()  # kept groups the driver has counted (admission budget)
        self.dropped_early: set[str] = set()  # dropped as stale before their request was collected
        # generated since the last step (samples_total: since the start); mixed_version: samples whose
        # tokens span several policy versions (in-flight weight updates)
        self.gen = {"groups": 0, "zero_variance": 0, "samples": 0, "mixed_version": 0, "samples_total": 0}
        self.worker_samples: dict[int, int] = {}  # samples generated per rollout worker since the last step
        self.faults = {"reward_failures": 0, "scored": 0, "retried_groups": 0, "worker_restarts": 0}
        self.train_seconds, self.trained_samples = 0.0, 0
        self.learner_wait, self.idle_since = 0.0, None  # seconds the learner waited on data this step
        self.wait_history: list[float] = []  # learner wait fraction of each step (autoscaling)
        self.last_weights = None  # (version, buckets ObjectRef) of the newest object-store export
        self.weight_group = (0, None)  # collective transport: (generation, member slots) of the current group
        self.resume_metrics: dict[str, float] = {}
        if resume_from is not None:
            from orchestrator import checkpoint

            self.resume_metrics = checkpoint.restore(self, resume_from)
        self.resumed = resume_from is not None

    def shutdown(self) -> None:
        """Kill every actor of this run (buffer, learner ranks, rollout workers) and free their placement groups."""
        import ray

        from orchestrator.placement import release

        for actor in [self.buffer, self.control, *self.learner.ranks]:
            ray.kill(actor)
        for slot in list(self.rollout.slots):
            self.rollout.release(slot)
        release(self.learner.pg)

    def evaluate(self, version: int) -> dict[str, float]:
        """Greedy held-out accuracy (strict exact match) with weights of ``version`` or newer."""
        if not self.eval_problems:
            return {}
        rc = self.cfg.rollout
        t0 = time.perf_counter()
        # one request per worker, which may first wait for the weights of `version`
        acc = self.rollout.evaluate(self.eval_problems, version, self.cfg.eval_max_tokens or rc.max_tokens,
                                    rc.request_timeout_s + rc.weight_push_timeout_s)
        return {"eval/accuracy": acc, "eval/seconds": time.perf_counter() - t0}

    def run(self, progress: bool = True) -> dict:
        """Train ``cfg.num_steps`` steps; returns the summary (last metrics record + totals).

        Raises:
            TimeoutError: a generation, learner step or weight push exceeded its timeout.
        """
        import ray
        from tqdm import tqdm

        from orchestrator.metrics import MetricsLogger

        cfg, rc = self.cfg, self.cfg.rollout
        # a resumed run continues its own curves: records past the checkpoint are dropped
        self.metrics_log = MetricsLogger(self.run_dir, keep_steps_upto=self.version if self.resumed else None,
                                         wandb_cfg=cfg.metrics, run_config=cfg.model_dump(mode="json"))
        last = self.metrics_log.log(0, self.evaluate(0)) if self.version == 0 else {}
        self.acc = {"tokens": 0.0, "load_seconds": 0.0}
        for req in self.reissue:  # a resumed run's in-flight prompts first
            self._send(req)
        self.reissue = []
        self.t_step, train_refs = time.perf_counter(), []
        self.idle_since = self.t_step
        bar = tqdm(total=cfg.num_steps, initial=self.version, disable=not progress, desc="train", unit="step")
        while self.version < cfg.num_steps:
            self._apply_scaling()
            self._dispatch()
            if not train_refs and self._fresh_groups() >= cfg.prompts_per_step:  # learner idle, batch ready
                batch_ref, take_ref = self.buffer.take_batch.options(num_returns=2).remote(
                    cfg.prompts_per_step, self.version)
                train_refs = self.learner.train_step_remote(batch_ref, self.version)
                self.ready_groups -= cfg.prompts_per_step
                self.learner_wait += time.perf_counter() - self.idle_since
            wait_s = max(rc.request_timeout_s, cfg.learner.step_timeout_s if train_refs else 0.0)
            done, _ = ray.wait(list(self.inflight) + train_refs, num_returns=1, timeout=wait_s)
            if not done:
                raise TimeoutError(f"no generation (rollout workers) or learner step finished within {wait_s:.0f} s")
            self._collect_generations()
            self._check_pushes()
            if train_refs and self._learner_step_done(train_refs):
                # the budget counts training wall clock; held-out evals pause the loop and are excluded
                spent = self.train_seconds + time.perf_counter() - self.t_step
                out_of_time = bool(cfg.time_budget_s) and spent >= cfg.time_budget_s
                last = self._finish_step(train_refs, take_ref, final=out_of_time)
                train_refs, self.idle_since = [], time.perf_counter()
                bar.update(1)
                num = lambda k: last.get(k) if last.get(k) is not None else float("nan")  # noqa: E731
                bar.set_postfix(samples_s=f"{self.trained_samples / max(self.train_seconds, 1e-9):.2f}",
                                reward=f"{num('rollout/reward_mean'):.3f}", acc=f"{num('eval/accuracy'):.3f}",
                                stale=f"{num('off_policy/staleness_max'):.0f}",
                                wait=f"{num('perf/learner_wait_frac'):.0%}")
                ck = cfg.checkpoint
                if ck.every and (self.version % ck.every == 0 or out_of_time or self.version == cfg.num_steps):
                    from orchestrator import checkpoint

                    checkpoint.save(self)
                    self.t_step = self.idle_since = time.perf_counter()  # like evals, checkpoint writes are not step time
                if out_of_time:
                    logger.info("time budget of %.0f s reached after %d steps", cfg.time_budget_s, self.version)
                    break
        bar.close()
        _wait([r for _, _, refs in self.pushes for r in refs], rc.weight_push_timeout_s, "final weight push")
        final_dir = self.learner.save_pretrained(str(self.run_dir / "final_model"))
        stats = _wait([w.stats.remote() for w in self.rollout.workers], 60, "rollout stats")
        summary = {**last, **self._audit_groups(), "weights/load_seconds_total": sum(s["load_seconds"] for s in stats),
                   "perf/trained_samples_per_s": self.trained_samples / max(self.train_seconds, 1e-9),
                   "final_model": final_dir}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics_log.close()
        return summary

    def _audit_groups(self) -> dict[str, float]:
        """Where every dispatched group ended up; the ``data/*`` counts add up to ``data/dispatched_groups``."""
        import ray

        led = ray.get(self.buffer.ledger.remote(), timeout=60)
        unarrived = {k for r in self.inflight.values() for k in r["keys"]} - led["held"] - led["taken"]
        return {"data/dispatched_groups": float(self.dispatched), "data/trained_groups": float(len(led["taken"])),
                "data/groups_in_buffer": float(len(led["held"])), "data/groups_in_flight": float(len(unarrived)),
                "data/groups_filtered": float(led["filtered"]), "data/groups_dropped_stale": float(led["dropped"])}

    def _dispatch(self) -> None:
        """Admission control: send prompts while the staleness budget allows (<= 2 requests per worker).

        Budget is counted in groups kept by the buffer plus groups in flight, so groups that dynamic
        sampling filters out free their slot and are replaced (the refill).
        """
        cfg, rc, P = self.cfg, self.cfg.rollout, self.cfg.prompts_per_step
        limit = min((cfg.buffer.max_staleness + self.version + 1) * P, cfg.num_steps * P)
        while self.kept + self.inflight_groups < limit and self.rollout.has_capacity(2):
            pos = self.kept + self.inflight_groups  # FIFO position of this request's first group, at most
            k = min(rc.prompts_per_request, limit - pos)
            # the last group of this request is trained at step (pos + k - 1) // P at the latest
            min_version = max(0, (pos + k - 1) // P - cfg.buffer.max_staleness)
            problems, sizes = self.allocator.take(self.sampler, k)
            self._send({"problems": problems, "sizes": sizes, "keys": [f"g{self.dispatched + i}" for i in range(k)],
                        "min_version": min_version, "seed": cfg.seed * 100003 + self.dispatched})
            self.dispatched += k

    def _send(self, req: dict) -> None:
        """One generate request (``problems``, ``sizes``, ``keys``, ``min_version``, ``seed``) to the
        least-loaded worker, remembered until it is collected."""
        idx = self.rollout.least_loaded()
        ref = self.rollout.generate_remote(idx, req["problems"], req["keys"], req["min_version"], req["seed"],
                                           req["sizes"])
        self.inflight[ref] = {**req, "worker": idx}
        self.inflight_groups += len(req["keys"])

    def remaining(self, req: dict, done: set[str]) -> dict | None:
        """Count the groups of ``req`` that reached the buffer or were trained (ids in ``done``) as kept,
        and return the request for the others (None when none is left). Used on worker recovery and resume."""
        for key in set(req["keys"]) & done:
            self._count_kept(key)
        todo = [i for i, k in enumerate(req["keys"]) if k not in done]
        if not todo:
            return None
        sizes = req.get("sizes") or [self.cfg.rollout.group_size] * len(req["keys"])  # older checkpoints
        return {"problems": [req["problems"][i] for i in todo], "keys": [req["keys"][i] for i in todo],
                "sizes": [sizes[i] for i in todo], "min_version": req["min_version"], "seed": req["seed"]}

    def _collect_generations(self) -> None:
        """Account finished generate calls; feed group rewards to the prompt sampler.

        Raises:
            RuntimeError: dynamic sampling generated more than ``max_refill_factor * prompts_per_step``
                groups since the last step without filling a batch.
        """
        import ray

        if not self.inflight:
            return
        finished, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        for ref in finished:
            req = self.inflight.pop(ref)
            k = len(req["keys"])
            self.rollout.done(req["worker"])
            try:
                meta = ray.get(ref)  # re-raises a worker's error here, in the main loop
            except ray.exceptions.RayActorError as e:  # the worker process died: recover it, retry the prompts
                self._recover_worker(req, e)
                continue
            self.inflight_groups -= k
            for key in meta["kept_keys"]:
                self._count_kept(key)
            for prompt_id, rewards in meta["group_rewards"]:
                self.sampler.update(prompt_id, rewards)
                self.gen["zero_variance"] += int(max(rewards) - min(rewards) < 1e-6)
            self.gen["groups"] += k
            self.gen["samples_total"] += int(meta["samples"])
            w = int(meta["worker"])
            self.worker_samples[w] = self.worker_samples.get(w, 0) + int(meta["samples"])
            self.faults["reward_failures"] += int(meta["reward_failures"])
            self.gen["mixed_version"] += int(meta["mixed_version_samples"])
            self.gen["samples"] += int(meta["samples"])
            self.faults["scored"] += int(meta["samples"])
            self.acc["tokens"] += meta["tokens"]
            self.acc["load_seconds"] += meta["load_seconds"]
        f, limit = self.faults, self.cfg.rollout.max_reward_failure_frac
        if self.version >= 1 and f["reward_failures"] > limit * f["scored"]:
            raise RuntimeError(
                f"{f['reward_failures']} of {f['scored']} samples failed their reward function (more than "
                f"rollout.max_reward_failure_frac = {limit:g}); the rollout worker logs name each failure")
        bc, P = self.cfg.buffer, self.cfg.prompts_per_step
        if bc.dynamic_sampling and self.gen["groups"] > bc.max_refill_factor * P and self.ready_groups < P:
            raise RuntimeError(
                f"dynamic sampling generated {self.gen['groups']} groups since the last step and kept only "
                f"{self.ready_groups} of the {P} needed ({self.gen['zero_variance']} had all-equal rewards): the "
                "prompts are all solved or all failed by this policy. Change the data, or raise "
                f"buffer.max_refill_factor (now {bc.max_refill_factor:g})")

    def _count_kept(self, key: str) -> None:
        """A group reached the buffer: it now counts against the admission budget (unless already dropped)."""
        if key in self.dropped_early:
            self.dropped_early.discard(key)
        else:
            self.kept += 1
            self.collected.add(key)

    def _fresh_groups(self) -> int:
        """Groups in the buffer that can be trained now, after the buffer drops any past the bound.

        Out-of-order arrivals (several workers, a slow request) can leave a group older than the
        bound; its slot in the admission budget is freed here so a fresh group replaces it.
        """
        import ray

        st = ray.get(self.buffer.drop_stale.remote(self.version), timeout=60)
        for key in st["dropped_ids"]:
            if key in self.collected:
                self.collected.discard(key)
                self.kept -= 1
            else:  # its request is not collected yet: do not count it when it is
                self.dropped_early.add(key)
        self.ready_groups = st["fresh"]
        return self.ready_groups

    def _learner_step_done(self, train_refs: list) -> bool:
        """Whether every rank finished the step; raises at once if a rank died (its peers would wait
        in a collective until the timeout).

        Raises:
            RuntimeError: a learner rank died; names the last complete checkpoint.
        """
        import ray

        ready, pending = ray.wait(train_refs, num_returns=len(train_refs), timeout=0)
        for ref in ready:
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                from orchestrator.checkpoint import latest_checkpoint

                ckpt = latest_checkpoint(self.run_dir)
                raise RuntimeError(
                    f"learner rank {train_refs.index(ref)} died during step {self.version + 1} ({type(e).__name__}); "
                    f"the run stops. Last complete checkpoint: {ckpt or 'none (set checkpoint.every)'}; continue "
                    "with `relayrl train CONFIG --resume`") from None
        return not pending

    def _apply_scaling(self) -> None:
        """About once a second: match the rollout worker count to what `relayrl scale` asked for.

        A new worker gets the current weights before it takes prompts; a removed one is drained
        (no new requests; it finishes its own) and killed when idle, so no prompt is lost.
        """
        import ray

        from orchestrator.placement import bundle

        now = time.monotonic()
        if now < self._next_control_poll:
            return
        self._next_control_poll = now + 1.0
        want, rc = ray.get(self.control.desired.remote(), timeout=30), self.cfg.rollout
        active = self.rollout.active
        while len(active) < want:
            free, need = ray.available_resources(), bundle(rc.num_cpus, rc.num_gpus, rc.resources)
            if any(free.get(k, 0.0) + 1e-9 < v for k, v in need.items()):
                logger.warning("scale to %d rollout workers: the cluster has no room for another (needs %s; free %s)",
                               want, need, free)
                break
            try:
                slot = self.rollout.add_worker()
            except RuntimeError as e:  # could not be placed or started: keep running with what we have
                logger.warning("scale to %d rollout workers: %s", want, e)
                break
            self._bring_to_current(slot, f"new rollout worker {slot}")
            logger.info("rollout worker %d added at policy version %d", slot, self.version)
            active = self.rollout.active
        for slot in sorted(active, reverse=True)[: max(0, len(active) - want)]:
            self.rollout.drain(slot)
            logger.info("rollout worker %d draining", slot)
        for slot in self.rollout.retire_drained():
            logger.info("rollout worker %d removed", slot)
        self.control.report.remote({"rollout_workers": len(self.rollout.active), "version": self.version})

    def _autoscale(self, wait_frac: float) -> None:
        """Automatic rollout scaling (``rollout.autoscale_max_workers > 0``), through the same control
        actor as `relayrl scale`: one worker more after ``autoscale_patience`` steps in a row in which the
        learner waited on data for more than ``autoscale_wait_frac`` of the step, one fewer (not below
        ``rollout.num_workers``) after as many steps in which it waited under a tenth of that."""
        import ray

        rc = self.cfg.rollout
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
        self.wait_history, self._next_control_poll = [], 0.0  # judge the new size afresh; apply it now

    def _recover_worker(self, req: dict, err: Exception) -> None:
        """Bring a dead rollout worker back (restart or replacement), give it the current weights, and
        re-issue the groups of its failed request that never reached the buffer."""
        import ray

        idx, rc = req["worker"], self.cfg.rollout
        logger.warning("rollout worker %d died (%s); recovering it", idx, type(err).__name__)
        how = self.rollout.recover(idx, rc.request_timeout_s)
        self.faults["worker_restarts"] += 1
        self._bring_to_current(idx, f"recovered rollout worker {idx}")
        held, taken = ray.get(self.buffer.group_ids.remote(), timeout=60)
        self.inflight_groups -= len(req["keys"])
        todo = self.remaining(req, held | taken)  # groups written just before the worker died count as kept
        if todo:
            self._send(todo)
        n = len(todo["keys"]) if todo else 0
        self.faults["retried_groups"] += n
        logger.warning("rollout worker %d %s; %d groups re-issued", idx, how, n)

    def _bring_to_current(self, slot: int, who: str) -> None:
        """Give worker ``slot`` the current weights through the object store (a new or recovered worker,
        before it takes prompts); with the collective transport they are exported for it first."""
        if self.version == 0:
            return  # it loaded the base model
        rc = self.cfg.rollout
        if self.last_weights is None or self.last_weights[0] < self.version:
            self.last_weights = (self.version, self.learner.export_weights_remote(rc.dtype, rc.weight_bucket_bytes)[0])
        _wait([self.rollout.slots[slot].receive_weights.remote(*self.last_weights)], rc.weight_push_timeout_s,
              f"weight push to {who}")

    def _push_weights(self) -> dict[str, float]:
        """Start the push of the new policy version to every rollout worker; returns export metrics.

        Object store: rank 0 exports buckets once, each worker fetches them while it keeps generating.
        Collective: rank 0 broadcasts them over the weight group, rebuilt first if workers came or went;
        a broadcast that fails (a worker died in it) falls back to the object store.
        """
        import ray

        rc, deadline = self.cfg.rollout, time.monotonic() + self.cfg.rollout.weight_push_timeout_s
        if rc.weight_transport == "collective":
            try:
                members = self._weight_group()
                worker_refs = [self.rollout.slots[s].receive_broadcast.remote() for s in members]
                out = _wait([r.broadcast_weights.remote(self.version, rc.dtype, rc.weight_bucket_bytes)
                             for r in self.learner.ranks], rc.weight_push_timeout_s, "weight broadcast")[0]
                self.pushes.append((deadline, self.version, worker_refs))
                return out
            except (ray.exceptions.RayError, TimeoutError) as e:
                logger.warning("weight broadcast of version %d failed (%s); pushing through the object store",
                               self.version, e)
                self.weight_group = (self.weight_group[0], None)  # rebuild before the next broadcast
        buckets_ref, export_ref = self.learner.export_weights_remote(rc.dtype, rc.weight_bucket_bytes)
        self.pushes.append((deadline, self.version, self.rollout.push_weights_remote(self.version, buckets_ref)))
        self.last_weights = (self.version, buckets_ref)  # for workers that come back after a failure
        return ray.get(export_ref, timeout=rc.weight_push_timeout_s)

    def _weight_group(self) -> tuple[int, ...]:
        """The rollout slots of the current weight-broadcast group, (re)built when the workers changed."""
        import ray

        gen, members = self.weight_group
        now = tuple(sorted(self.rollout.slots))
        if members == now:
            return members
        rc, lc = self.cfg.rollout, self.cfg.learner
        backend = rc.collective_backend
        if backend == "auto":
            backend = "nccl" if lc.num_gpus > 0 and rc.num_gpus > 0 else "gloo"
        pending = [r for _, _, refs in self.pushes for r in refs]  # a group changes only between pushes
        if len(ray.wait(pending, num_returns=len(pending), timeout=rc.weight_push_timeout_s)[0]) < len(pending):
            raise TimeoutError(f"weight pushes did not finish within {rc.weight_push_timeout_s:.0f} s")
        self._check_pushes()
        addr, port = ray.get(self.learner.ranks[0].master_address.remote(), timeout=60)
        name, world = f"{self.run_dir.name}/weights/{gen + 1}", len(now) + 1
        refs = [self.learner.ranks[0].join_weight_group.remote(backend, addr, port, world, rc.weight_push_timeout_s, name)]
        refs += [self.rollout.slots[s].join_weight_group.remote(backend, addr, port, i + 1, world,
                                                                rc.weight_push_timeout_s, name)
                 for i, s in enumerate(now)]
        _wait(refs, rc.weight_push_timeout_s, f"weight group {name} ({backend}, {world} members)")
        self.weight_group = (gen + 1, now)
        logger.info("weight group %s: %s, learner rank 0 + rollout workers %s", name, backend, list(now))
        return now

    def _check_pushes(self) -> None:
        """Retire finished weight pushes; raise if one is past its deadline."""
        import ray

        still = []
        for deadline, version, refs in self.pushes:
            if not ray.wait(refs, num_returns=len(refs), timeout=0)[1]:
                # reloads done on arrival; deferred ones are counted by the next generate call
                for r in refs:
                    try:
                        self.acc["load_seconds"] += ray.get(r)["load_seconds"]
                    except ray.exceptions.RayActorError:  # a dead worker gets the latest weights on recovery
                        logger.warning("weight push of version %d hit a dead rollout worker", version)
                    except ray.exceptions.RayTaskError as e:  # a broken broadcast: the fallback push covers it
                        logger.warning("weight broadcast of version %d failed on a rollout worker: %s", version, e)
            elif time.monotonic() > deadline:
                raise TimeoutError(f"weight push of policy version {version} to the rollout workers did not "
                                   f"finish within {self.cfg.rollout.weight_push_timeout_s:.0f} s")
            else:
                still.append((deadline, version, refs))
        self.pushes = still

    def _finish_step(self, train_refs: list, take_ref, final: bool = False) -> dict:
        """Collect a learner step, bump the version, push weights asynchronously, log metrics.

        Evaluates after the last step (``final`` or ``num_steps`` reached) and every ``eval_every``.
        """
        import ray

        cfg, rc = self.cfg, self.cfg.rollout
        m = self.learner.merge_metrics(_wait(train_refs, cfg.learner.step_timeout_s, "learner step"))
        m.update(ray.get(take_ref, timeout=60))
        self.metrics_log.audit(self.version + 1, m.pop("_group_ids"))
        self.trained_samples += int(m["learner/samples"])
        self.version += 1
        m.update(self._push_weights())
        now = time.perf_counter()
        elapsed, self.train_seconds, self.t_step = now - self.t_step, self.train_seconds + now - self.t_step, now
        m.update({
            "perf/step_seconds": elapsed,
            "perf/train_seconds": self.train_seconds,
            "perf/rollout_tokens_per_s": self.acc["tokens"] / elapsed,
            "perf/learner_tokens_per_s": m["learner/tokens"] / max(m["learner/seconds"], 1e-9),
            "weights/load_seconds": self.acc["load_seconds"],
            "policy/version": float(self.version),
        })
        if m.get("learner/skipped_steps", 0) > 0:
            self.faults["consecutive_skips"] = self.faults.get("consecutive_skips", 0) + 1
            logger.warning("step %d: optimizer step skipped: non-finite gradients (loss %s)", self.version,
                           m.get("learner/loss"))
            if self.faults["consecutive_skips"] >= cfg.learner.max_skipped_steps:
                raise RuntimeError(
                    f"{self.faults['consecutive_skips']} consecutive optimizer steps had non-finite gradients "
                    f"(learner.max_skipped_steps = {cfg.learner.max_skipped_steps}); last loss {m.get('learner/loss')}")
        else:
            self.faults["consecutive_skips"] = 0
        m["rollout/num_workers"] = float(len(self.rollout.active))
        m["perf/learner_wait_seconds"], self.learner_wait = self.learner_wait, 0.0
        m["perf/learner_wait_frac"] = m["perf/learner_wait_seconds"] / max(elapsed, 1e-9)
        self._autoscale(m["perf/learner_wait_frac"])
        m.update({f"rollout/worker_{w}_samples_per_s": n / elapsed for w, n in sorted(self.worker_samples.items())})
        self.worker_samples = {}
        f = self.faults
        m.update({"rollout/reward_failed_frac": f["reward_failures"] / max(f["scored"], 1),
                  "rollout/retried_groups": float(f["retried_groups"]),
                  "rollout/worker_restarts": float(f["worker_restarts"])})
        m.update(self.resume_metrics)  # logged once, with the first step after a resume
        self.resumed, self.resume_metrics = self.resumed or bool(self.resume_metrics), {}
        g = self.gen
        m.update({
            "curation/groups_generated": float(g["groups"]),
            "curation/zero_variance_generated_frac": g["zero_variance"] / g["groups"] if g["groups"] else 0.0,
            "curation/rollouts_per_trained_sample": g["samples_total"] / max(self.trained_samples, 1),
            **self.sampler.metrics(), **self.allocator.metrics(),
        })
        m["rollout/mixed_version_frac"] = g["mixed_version"] / max(g["samples"], 1)
        g["groups"] = g["zero_variance"] = g["mixed_version"] = g["samples"] = 0
        self.acc = {"tokens": 0.0, "load_seconds": 0.0}
        if final or self.version == cfg.num_steps or (cfg.eval_every and self.version % cfg.eval_every == 0):
            m.update(self.evaluate(self.version))
        self.t_step = time.perf_counter()  # eval time is not step time
        return self.metrics_log.log(self.version, m)


def train(cfg, run_dir: Path, model_path: str, train_problems: list, eval_problems: list,
          progress: bool = True, resume_from: Path | None = None) -> dict:
    """Build a `Trainer` (restored from ``resume_from`` when given) and run it; returns its summary."""
    return Trainer(cfg, run_dir, model_path, train_problems, eval_problems, resume_from=resume_from).run(progress)
