"""The training loop: generation and training run at the same time, bounded in staleness.

`Trainer` owns the actors of one run (replay buffer, learner group, rollout group, reward-model pools, control
actor) and composes the pieces that each own one concern: admission control (`buffer.StalenessManager`: no
sample ever exceeds ``buffer.max_staleness``; ``0`` is the synchronous schedule through the same
code), weight sync (`orchestrator.weight_sync`), scaling and worker recovery (`orchestrator.scaling`),
rollout counters and the reward-failure budget (`orchestrator.tally`), the training clock and totals
(`orchestrator.clock`), checkpoints (`orchestrator.checkpoint`, handed each part's state), the run's
outputs on a local path or a storage URI (`orchestrator.run_outputs`), the run-time check that the learner
and the engines agree (`orchestrator.sentinel`: at its versions the next step waits for responses sampled
with the learner's weights). Prompts come from a `buffer`
prompt sampler fed with every group's rewards; with dynamic sampling the buffer drops zero-variance
groups and admission control refills their slots.

Every remote wait is bounded: each generate request by ``rollout.request_timeout_s`` (counted from
when the weights it needs exist), each learner step by ``learner.step_timeout_s``, each weight push by
``weights.push_timeout_s``.

A dead learner rank costs at most one step: the ranks are replaced and restored from in-memory snapshots
(`orchestrator.failover`), or, where the snapshot died with the rank, the run goes on from its last checkpoint
(`train`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from base import storage
from base.adapter import check_target_modules
from buffer import PROMPT_SAMPLERS, GenerateRequest, ReplayBuffer, StalenessManager
from buffer.allocation import RolloutAllocator
from learner import LearnerGroup, LearnerWorker
from orchestrator import checkpoint
from orchestrator.clock import RunClock
from orchestrator.control import start_control
from orchestrator.dispatch import Dispatcher
from orchestrator.failover import LearnerFailover, LearnerLost, rank_died
from orchestrator.learner_step import LearnerStep, SkippedSteps
from orchestrator.metrics import MetricsLogger, held_out_metrics, pass_k_metrics
from orchestrator.models import model_source, module_names, resolve_model_path
from orchestrator.placement import (SlotPlacement, learner_bundle, on_driver_node, release, reserve,
                                    reward_model_bundle, rollout_bundle, scheduling, wait_for_resources)
from orchestrator.progress import StepProgress
from orchestrator.remote import wait_all
from orchestrator.run_outputs import RunOutputs
from orchestrator.scaling import Scaler
from orchestrator.sentinel import Sentinel
from orchestrator.tally import RolloutTally
from orchestrator.weight_sync import WeightSync
from rollout import RewardModelPool, RolloutGroup, RolloutWorker, reward_models_env

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from orchestrator.config import RunConfig


class Trainer:
    """Owns the actors of one run and runs the loop.

    Construction starts every actor and waits until they are up; `run` trains; the actors stay
    alive afterwards so callers (tests, benchmarks) can inspect them. ``learner_worker_cls`` /
    ``rollout_worker_cls`` substitute subclasses of the real workers (e.g. deliberately slowed ones).

    Raises:
        RuntimeError: the cluster cannot host the actors.
    """

    def __init__(self, cfg: RunConfig, run_dir: str | Path, model_path: str, train_problems: list,
                 eval_problems: list, learner_worker_cls: type | None = None, rollout_worker_cls: type | None = None,
                 resume_from: str | Path | None = None) -> None:
        import ray

        self.cfg, self.eval_problems = cfg, eval_problems
        self.eval_start: list[bool] | None = None  # the start policy's held-out results, for eval/gain
        # run_dir: a local path or a storage URI; the driver's own files go to a local dir synced to it
        self.outputs = RunOutputs(str(run_dir), resume=resume_from is not None)
        self.run_uri, self.run_dir = self.outputs.uri, self.outputs.local_dir
        bc, lc, rc, P = cfg.buffer, cfg.learner, cfg.rollout, cfg.prompts_per_step
        wait_for_resources(cfg, cfg.ray.wait_for_resources_s)
        if lc.lora is not None:  # before any actor starts: a wrong module name is a config error
            check_target_modules(lc.lora, module_names(model_path))
        # rollout workers find the buffer (and the model file server) by name: a handle among their
        # constructor arguments makes Ray log an error for every restartable actor
        buffer_name = f"relayrl-buffer-{uuid.uuid4().hex[:12]}"
        self.buffer = ray.remote(ReplayBuffer).options(name=buffer_name, num_cpus=0,
                                                       scheduling_strategy=on_driver_node()).remote(
            dynamic_sampling=bc.dynamic_sampling, prioritized=bc.prioritized_replay,
            value_tracker_discount=bc.value_tracker_discount if bc.value_tracker else None,
            self_imitation=(si.capacity, si.fraction, si.min_reward) if (si := bc.self_imitation).fraction else None,
            seed=cfg.seed)
        self.learner_pg = reserve([learner_bundle(cfg)] * lc.num_learners,
                                  lc.placement_strategy, lc.node_labels, cfg.ray.placement_timeout_s, "the learner ranks")
        # the model by content, so actors on nodes that cannot see model_path get a copy of their own
        self.model, self.model_server = model_source(model_path,
                                                     uri=cfg.model.path if storage.is_remote(cfg.model.path) else None)
        # the rollout workers start (vLLM import, engine) while the learner ranks start (torch, DeepSpeed):
        # the two start-ups overlap instead of adding up
        self.reward_models = self._start_reward_models()  # the workers reach them through their environment
        placement = SlotPlacement(rollout_bundle(cfg), rc.node_labels, cfg.ray.placement_timeout_s)
        self.rollout = RolloutGroup(rc, cfg.data, self.model, buffer_name, placement,
                                    worker_cls=rollout_worker_cls or RolloutWorker, lora=lc.lora, wait=False,
                                    env_vars=reward_models_env(self.reward_models))
        if rc.num_gpus and lc.num_gpus and min(rc.num_gpus, lc.num_gpus) < 1:
            # a learner rank and an engine may share a GPU: vLLM checks the GPU's free memory while it starts,
            # which a learner allocating at the same moment makes fail, so the engines start first, alone
            self.rollout.wait_up()
        try:
            self.learner = LearnerGroup(lc, self.model, [scheduling(self.learner_pg, r) for r in range(lc.num_learners)],
                                        cfg.samples_per_step, rc.max_tokens, rc.temperature, cfg.seed,
                                        worker_cls=learner_worker_cls or LearnerWorker)
            self._check_run_dir_visible()
        except BaseException:  # no rollout worker outlives a learner that failed to start
            for slot in list(self.rollout.slots):
                self.rollout.release(slot)
            for pool in self.reward_models:
                pool.shutdown()
            raise
        self.rollout.wait_up()
        for pool in self.reward_models:
            pool.wait_up()
        self.sampler = PROMPT_SAMPLERS[bc.prompt_sampler](train_problems, cfg.seed, group_size=rc.group_size,
                                                           floor=bc.sampler_floor)
        self.allocator = RolloutAllocator(bc.rollout_allocation, rc.group_size, P, bc.allocation_min_n,
                                          bc.allocation_max_n)
        self.control = start_control(self.outputs.name, rc.num_workers,
                                     {p.cfg.name: len(p.slots) for p in self.reward_models})
        self.staleness = StalenessManager(bc.max_staleness, P, cfg.num_steps)
        self.tally = RolloutTally(rc.max_reward_failure_frac)
        self.weight_sync = WeightSync(cfg.weights, self.learner, self.rollout, rc.dtype, self.outputs.name,
                                      lc.num_gpus > 0 and rc.num_gpus > 0, bounds=cfg.sentinel)
        self.scaler = Scaler(rc, self.rollout, self.control, self.weight_sync, self.reward_models)
        self.sentinel = Sentinel(cfg.sentinel, bc.max_staleness, cfg.num_steps)
        self.dispatcher = Dispatcher(cfg, self.rollout, self.buffer, self.staleness, self.tally, self.scaler,
                                     self.sampler, self.allocator, self.sentinel)
        self.reissue: list[GenerateRequest] = []  # a resumed run's in-flight requests, sent first
        self.clock, self.skipped = RunClock(), SkippedSteps(lc.max_skipped_steps)
        self.resume_metrics: dict[str, float] = {}  # logged with the first step after a resume
        if resume_from is not None:
            self.resume_metrics = checkpoint.restore(resume_from, cfg.model_dump(mode="json"), learner=self.learner,
                                                     buffer=self.buffer, trainer=self, weight_sync=self.weight_sync)
        self.resumed = resume_from is not None
        self.sentinel.start_at(self.version)  # a resumed run checks its restored weights at once
        self.failover = LearnerFailover(lc, self.learner, self.run_uri)
        self.failover.snapshot(self.version, due=True)  # new ranks start from the model, not from a restored version

    def _check_run_dir_visible(self) -> None:
        """Every learner rank writes a probe file into the run dir, where its checkpoints and the final model will go,
        and the driver must see each one: a local ``output_dir`` that a rank's node does not share is a one-line
        error before anything trains, not after the run (`checkpoint.check_visible`)."""
        token = uuid.uuid4().hex[:12]
        names = self.learner.write_probes(self.run_uri, token)
        checkpoint.check_visible(self.run_uri, names, "its start-up probe file", self.run_uri)
        storage.remove(storage.join(self.run_uri, ".probe"))

    @property
    def version(self) -> int:
        """The learner's policy version (optimizer steps done)."""
        return self.staleness.version

    def shutdown(self) -> None:
        """Kill every actor of this run (buffer, learner ranks, rollout workers) and free their placement groups."""
        import ray

        store = [self.failover.store] if getattr(self, "failover", None) and self.failover.store else []
        for actor in [self.buffer, self.control, self.model_server, *self.reward_model_servers, *self.learner.ranks,
                      *store]:
            ray.kill(actor)
        for slot in list(self.rollout.slots):
            self.rollout.release(slot)
        for pool in self.reward_models:
            pool.shutdown()
        release(self.learner_pg)

    def _start_reward_models(self) -> list[RewardModelPool]:
        """Start one `RewardModelPool` per ``[[reward_models]]`` entry (not waited for here); each model is served
        to nodes that cannot see it, as the policy's is."""
        pools, self.reward_model_servers = [], []
        for r in self.cfg.reward_models:
            uri = r.model if storage.is_remote(r.model) else None
            source, server = model_source(resolve_model_path(r.model), uri=uri)
            self.reward_model_servers.append(server)
            placement = SlotPlacement(reward_model_bundle(r), r.node_labels, self.cfg.ray.placement_timeout_s,
                                      f"reward model {r.name!r} server")
            pools.append(RewardModelPool(r, source, placement, wait=False))
        return pools

    def evaluate(self, version: int) -> dict[str, float]:
        """Greedy held-out accuracy (strict exact match) with weights of ``version`` or newer, its standard
        error, and its paired gain over the start policy's eval (`metrics.held_out_metrics`); with
        ``eval_pass_k_problems`` also pass@k on that many of the problems, sampled in the same engine calls
        (`metrics.pass_k_metrics`)."""
        if not self.eval_problems:
            return {}
        rc, n_pass = self.cfg.rollout, min(self.cfg.eval_pass_k_problems, len(self.eval_problems))
        k = self.cfg.eval_pass_k or rc.group_size
        t0 = time.perf_counter()
        # one request per worker, which may first wait for the weights of `version`
        args = (version, self.cfg.eval_max_tokens or rc.max_tokens, rc.request_timeout_s + rc.weight_wait_timeout_s)
        if n_pass:
            correct, counts = self.rollout.evaluate_pass_k(self.eval_problems, n_pass, k, *args)
        else:
            correct, counts = self.rollout.evaluate(self.eval_problems, *args), []
        m = {**held_out_metrics(correct, self.eval_start), **pass_k_metrics(counts, k, k)}
        if self.eval_start is None:
            self.eval_start = correct
        return {**m, "eval/seconds": time.perf_counter() - t0}

    def run(self, progress: bool = True) -> dict:
        """Train ``cfg.num_steps`` steps (or until ``time_budget_s``); returns the summary.

        Raises:
            TimeoutError: a learner step or weight push exceeded its timeout.
            RuntimeError: a learner rank died, or a failure budget was exceeded (e.g. a rollout worker hung once
                more than ``rollout.max_restarts`` allows: a request past ``rollout.request_timeout_s``).
            SentinelError (a RuntimeError): the learner and a rollout engine disagree on the logprobs of tokens
                sampled with the same weights (`orchestrator.sentinel`).
        """
        last = self._start_run()
        step: LearnerStep | None = None
        with StepProgress(self.cfg.num_steps, self.version, progress, start=last) as bar:
            while self.version < self.cfg.num_steps:
                try:
                    self.scaler.apply(self.version)
                    self.dispatcher.dispatch()
                    step = step or self._start_step()
                    self.dispatcher.wait(step.refs if step else [], step.deadline if step else None)
                    self.dispatcher.collect()
                    self.tally.load_seconds += self.weight_sync.retire()
                    if step is None or not step.done():
                        continue
                    finished, step = step, None
                    last, out_of_time = self._end_step(finished)
                except Exception as e:
                    why = rank_died(e, self.learner)
                    if why is None:
                        raise
                    step = self._fail_over(why, step)
                    continue
                bar.update(last, self.clock.samples_per_s())
                if out_of_time:
                    logger.info("time budget of %.0f s reached after %d steps", self.cfg.time_budget_s, self.version)
                    break
        return self._finish_run(last)

    def _fail_over(self, why: str, step: LearnerStep | None) -> LearnerStep | None:
        """A learner rank died: replace the ranks, restore the newest snapshot, train again the steps it lacks (their
        kept batches; metrics dropped: each step's record was logged when it first ran), push the current policy to
        every worker, start the step that was in flight again on its batch. Returns that step (or None).

        Raises:
            LearnerLost: no snapshot can restore the group (`train` resumes from the last checkpoint).
            RuntimeError: ``learner.max_failovers`` reached.
        """
        t0 = time.perf_counter()
        version = self.version
        for v, batch_ref in self.failover.recover(why, version):
            wait_all(self.learner.train_step_remote(batch_ref, v), self.cfg.learner.step_timeout_s,
                     f"learner step {v + 1} trained again after a failover")
            self.failover.snapshot(v + 1)
        self.weight_sync.learner_replaced(version)
        if step is not None:
            step.probe = self.sentinel.start(self.buffer, self.learner, step.version) if step.probe else None
            step.restart(self.learner)
            self.failover.step_started(step.version, step.batch_ref)
        self.failover.seconds += time.perf_counter() - t0
        logger.warning("learner failover done in %.1f s: policy version %d restored; training goes on",
                       time.perf_counter() - t0, version)
        return step

    # ---- the loop's parts --------------------------------------------------------------------
    def _start_run(self) -> dict:
        """Open the metrics log, evaluate the start policy, re-send a resumed run's requests."""
        cfg = self.cfg
        # a resumed run continues its own curves: records past the checkpoint are dropped
        self.metrics_log = MetricsLogger(self.run_dir, keep_steps_upto=self.version if self.resumed else None,
                                         wandb_cfg=cfg.metrics, run_config=cfg.model_dump(mode="json"))
        # a resumed run starts from its checkpoint's last record: one resumed at num_steps trains no step
        # and still ends with that step's summary
        last = self.metrics_log.log(0, self.evaluate(0)) if self.version == 0 else self.metrics_log.last
        for req in self.reissue:
            self.dispatcher.send(req)
        self.reissue = []
        self.clock.restart()
        return last

    def _finish_run(self, last: dict) -> dict:
        """Wait for the last weight push, save the final model, write ``summary.json``, copy the metrics
        files to the run's storage; returns the summary."""
        self.weight_sync.drain(self.cfg.weights.push_timeout_s)
        final_dir = self.learner.save_pretrained(storage.join(self.run_uri, "final_model"))
        checkpoint.check_visible(final_dir, ["config.json"], "the final model", self.run_uri)
        stats = wait_all([w.stats.remote() for w in self.rollout.workers], 60, "rollout stats")
        summary = {**last, **self._audit_groups(), **self.weight_sync.verify_metrics(run=True),
                   "weights/load_seconds_total": sum(s["load_seconds"] for s in stats),
                   "perf/trained_samples_per_s": self.clock.samples_per_s(),
                   "final_model": final_dir}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics_log.close()
        self.outputs.push()
        return summary

    def sync_outputs(self) -> None:
        """Flush the metrics files and copy the driver's run files to the run's storage (a local run: nothing)."""
        self.metrics_log.flush()
        self.outputs.push()

    def _audit_groups(self) -> dict[str, float]:
        """Where every dispatched group ended up; the ``data/*`` counts add up to ``data/dispatched_groups``."""
        import ray

        led = ray.get(self.buffer.ledger.remote(), timeout=60)
        unarrived = {k for f in self.dispatcher.requests.values() for k in f.req.keys} - led["held"] - led["taken"]
        return {"data/dispatched_groups": float(self.staleness.dispatched),
                "data/trained_groups": float(len(led["taken"])), "data/groups_in_buffer": float(len(led["held"])),
                "data/groups_in_flight": float(len(unarrived)), "data/groups_filtered": float(led["filtered"]),
                "data/groups_dropped_stale": float(led["dropped"])}

    def _start_step(self) -> LearnerStep | None:
        """Start a learner step when a full batch of fresh groups is held; else None."""
        import ray

        P = self.cfg.prompts_per_step
        st = ray.get(self.buffer.drop_stale.remote(self.staleness.oldest_trainable()), timeout=60)
        self.staleness.buffer_dropped(st["dropped_ids"], st["fresh"])
        if self.staleness.ready < P or self.sentinel.holds(self.version):
            return None
        probe = self.sentinel.start(self.buffer, self.learner, self.version)  # runs before the step on every rank
        self.staleness.took_batch()
        self.clock.learner_busy()
        step = LearnerStep.start(self.buffer, self.learner, P, self.version, self.staleness.oldest_trainable(),
                                 self.cfg.learner.step_timeout_s)
        step.probe = probe
        self.failover.step_started(step.version, step.batch_ref)
        return step

    def _end_step(self, step: LearnerStep) -> tuple[dict, bool]:
        """Finish a learner step: new version, weight push, metrics, evals, checkpoint.

        Returns ``(the step's metrics record, whether the time budget is spent)``.
        """
        cfg = self.cfg
        # the budget counts training wall clock; held-out evals and checkpoint writes are excluded
        out_of_time = self.clock.out_of_time(cfg.time_budget_s)
        m = self._step_metrics(step)
        if out_of_time or self.version == cfg.num_steps or (cfg.eval_every and self.version % cfg.eval_every == 0):
            m.update(self.evaluate(self.version))
        last = self.metrics_log.log(self.version, m)
        ck = cfg.checkpoint
        if ck.every and (self.version % ck.every == 0 or out_of_time or self.version == cfg.num_steps):
            checkpoint.save(self.run_uri, self.version, ck.keep, learner=self.learner, buffer=self.buffer,
                            trainer_state=self.state_dict(), sync_outputs=self.sync_outputs)
        self.clock.restart()
        return last, out_of_time

    def _step_metrics(self, step: LearnerStep) -> dict[str, float]:
        """Collect the learner's metrics, bump the version, start the weight push; the step's metrics."""
        import ray

        cfg = self.cfg
        m = self.learner.merge_metrics(wait_all(step.refs, cfg.learner.step_timeout_s, "learner step"))
        if step.probe is not None:  # a gap stops the run before this step's weights reach the workers
            m.update(self.sentinel.finish(step.probe, cfg.learner.step_timeout_s))
        stats = ray.get(step.stats_ref, timeout=60)
        m.update(stats.metrics)
        self.metrics_log.audit(self.version + 1, list(stats.group_ids), list(stats.replayed_ids))
        self.staleness.advance()
        self.dispatcher.start_clocks()
        m.update(self.weight_sync.push(self.version))
        self.skipped.check(self.version, m)
        m.update(self.clock.end_step(int(m["learner/samples"])))
        m.update({
            "perf/learner_tokens_per_s": m["learner/tokens"] / max(m["learner/seconds"], 1e-9),
            "policy/version": float(self.version), "rollout/num_workers": float(len(self.rollout.active)),
            **self.tally.step_metrics(m["perf/step_seconds"], self.clock.trained_samples), **self.staleness.metrics(),
            **self.sampler.metrics(), **self.allocator.metrics(), **self.resume_metrics,
        })
        for pool in self.reward_models:  # reward_model/<name>/*: items scored and failed during the step
            m.update(pool.metrics())
        m.update(self.failover.metrics())
        self.scaler.autoscale(m["perf/learner_wait_frac"])
        self.resume_metrics = {}  # logged once
        return m

    # ---- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The driver's state (JSON-able): admission counters, rollout totals, prompt sampler and
        allocator, training totals (`RunClock`), the requests in flight (re-issued on resume), the start
        policy's held-out results and the resolved config."""
        return {"staleness": self.staleness.state_dict(), "tally": self.tally.state_dict(),
                "sampler": self.sampler.state_dict(), "allocator": self.allocator.state_dict(),
                "clock": self.clock.state_dict(),
                "inflight": [f.req.to_dict() for f in self.dispatcher.requests.values()],
                "eval_start": self.eval_start,
                "config": self.cfg.model_dump(mode="json")}

    def load_state_dict(self, state: dict, done: set[str]) -> int:
        """Restore `state_dict` (or an older layout, `upgrade_state`) into this freshly built trainer; queue
        the in-flight requests minus the groups in ``done`` (reached the buffer or trained) for re-issue.
        Returns the groups queued."""
        state = upgrade_state(state)
        self.staleness.load_state_dict(state["staleness"])
        self.tally.load_state_dict(state["tally"])
        self.sampler.load_state_dict(state["sampler"])
        self.allocator.load_state_dict(state["allocator"])
        self.clock.load_state_dict(state["clock"])
        self.eval_start = state["eval_start"]
        todo = [self.dispatcher.remaining(GenerateRequest.from_dict(r), done) for r in state["inflight"]]
        self.reissue = [r for r in todo if r is not None]
        return sum(len(r.keys) for r in self.reissue)


def upgrade_state(state: dict) -> dict:
    """A `Trainer.state_dict` in the current layout, from any layout a checkpoint may hold: before
    `RunClock`, ``trainer.json`` kept the training totals (``train_seconds``, ``trained_samples``) at its
    top level instead of under ``clock``."""
    if "clock" in state:
        return state
    old = ("train_seconds", "trained_samples")
    return {**{k: v for k, v in state.items() if k not in old}, "clock": {k: state[k] for k in old}}


def train(cfg: RunConfig, run_dir: str | Path, model_path: str, train_problems: list, eval_problems: list,
          progress: bool = True, resume_from: str | Path | None = None, learner_worker_cls: type | None = None) -> dict:
    """Build a `Trainer` (restored from ``resume_from`` when given; ``learner_worker_cls`` as `Trainer`'s), run it and
    stop its actors; returns its summary.

    A learner rank that died with its snapshot (`orchestrator.failover.LearnerLost`) makes the run go on from its
    last complete checkpoint: the trainer's actors are stopped and a new trainer resumes from it, here, counted with
    the snapshot failovers against ``learner.max_failovers``.

    Raises:
        RuntimeError: a learner rank died with no checkpoint to go on from, or past ``learner.max_failovers``
            (names the last complete checkpoint and how to resume); and what `Trainer.run` raises.
    """
    used = 0
    while True:
        t = Trainer(cfg, run_dir, model_path, train_problems, eval_problems, resume_from=resume_from,
                    learner_worker_cls=learner_worker_cls)
        t.failover.earlier = used
        try:
            return t.run(progress)
        except LearnerLost as e:
            ckpt = checkpoint.latest_checkpoint(t.run_uri)
            used = t.failover.failovers + t.failover.earlier + 1
            if ckpt is None or used > cfg.learner.max_failovers:
                why = "no complete checkpoint (set checkpoint.every)" if ckpt is None else (
                    f"learner.max_failovers = {cfg.learner.max_failovers} reached")
                raise checkpoint.run_stops_for_dead_rank(t.run_uri, f"{e}; {why}", "none") from None
            logger.warning("%s; the run goes on from its last complete checkpoint %s", e, ckpt)
            resume_from = ckpt
        finally:
            t.shutdown()
