"""The training loop: generation and training run at the same time, bounded in staleness.

Admission control (AReaL's staleness manager): a new group is dispatched only while
``groups_dispatched < (max_staleness + version + 1) * prompts_per_step``. Group number ``d`` (0-based,
FIFO) is trained at step ``d // prompts_per_step`` or earlier, so it must be generated with policy
version ``>= d // prompts_per_step - max_staleness``; the request says so (``min_version``) and the
worker waits for those weights. Hence no sample ever exceeds the bound; the buffer's drop is only
a backstop. ``max_staleness = 0`` is the synchronous on-policy schedule through the same code.

Left out on purpose: checkpoint/resume, fault tolerance, curation (later additions).
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class PromptCursor:
    """Endless, seeded, epoch-shuffled walk over the training problems (state = epoch, position)."""

    def __init__(self, problems: list, seed: int) -> None:
        self.problems, self.seed, self.epoch, self.pos = problems, seed, 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.problems)))
        random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list:
        """Next ``k`` problems."""
        out = []
        for _ in range(k):
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.problems[self._order[self.pos]])
            self.pos += 1
        return out


def check_resources(cfg, cluster: dict[str, float]) -> None:
    """Fail fast when the cluster cannot host the run's actors (Ray would wait silently forever).

    Raises:
        RuntimeError: naming the resource, how much the config asks for and how much exists.
    """
    lc, rc = cfg.learner, cfg.rollout
    need = {
        "CPU": lc.num_learners * lc.num_cpus + rc.num_workers * rc.num_cpus,
        "GPU": lc.num_learners * lc.num_gpus + rc.num_workers * rc.num_gpus,
    }
    for res, amount in need.items():
        if amount > cluster.get(res, 0.0) + 1e-9:
            raise RuntimeError(
                f"the run needs {amount:g} {res} (learner: {lc.num_learners} x {getattr(lc, 'num_' + res.lower() + 's'):g}, "
                f"rollout: {rc.num_workers} x {getattr(rc, 'num_' + res.lower() + 's'):g}) but the Ray cluster has "
                f"{cluster.get(res, 0.0):g}; lower learner/rollout num_{res.lower()}s or add nodes"
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
                 learner_worker_cls: type | None = None, rollout_worker_cls: type | None = None) -> None:
        import ray

        from buffer import ReplayBuffer
        from learner.group import LearnerGroup
        from learner.worker import LearnerWorker
        from rollout.worker import RolloutGroup, RolloutWorker

        self.cfg, self.run_dir, self.eval_problems = cfg, Path(run_dir), eval_problems
        check_resources(cfg, ray.cluster_resources())
        self.buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote(cfg.buffer.max_staleness)
        self.learner = LearnerGroup(cfg.learner, model_path, cfg.samples_per_step, cfg.rollout.max_tokens,
                                    cfg.rollout.temperature, cfg.seed,
                                    worker_cls=learner_worker_cls or LearnerWorker)
        self.rollout = RolloutGroup(cfg.rollout, cfg.data, model_path, self.buffer,
                                    worker_cls=rollout_worker_cls or RolloutWorker)
        self.cursor = PromptCursor(train_problems, cfg.seed)
        self.version = 0

    def shutdown(self) -> None:
        """Kill every actor of this run (buffer, learner ranks, rollout workers), freeing their resources."""
        import ray

        for actor in [self.buffer, *self.learner.ranks, *self.rollout.workers]:
            ray.kill(actor)

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
        self.metrics_log = MetricsLogger(self.run_dir)
        last = self.metrics_log.log(0, self.evaluate(0))
        logger.info("step 0: held-out accuracy %s", last.get("eval/accuracy"))
        self.dispatched, self.ready_groups, self.inflight, self.pushes = 0, 0, {}, []
        self.acc = {"tokens": 0.0, "load_seconds": 0.0}
        self.train_seconds = 0.0
        self.t_step, train_refs = time.perf_counter(), []
        bar = tqdm(total=cfg.num_steps, disable=not progress, desc="train", unit="step")
        while self.version < cfg.num_steps:
            self._dispatch()
            if not train_refs and self.ready_groups >= cfg.prompts_per_step:  # learner idle, batch ready
                batch_ref, take_ref = self.buffer.take_batch.options(num_returns=2).remote(
                    cfg.prompts_per_step, self.version)
                train_refs = self.learner.train_step_remote(batch_ref, self.version)
                self.ready_groups -= cfg.prompts_per_step
            wait_s = max(rc.request_timeout_s, cfg.learner.step_timeout_s if train_refs else 0.0)
            done, _ = ray.wait(list(self.inflight) + train_refs[:1], num_returns=1, timeout=wait_s)
            if not done:
                raise TimeoutError(f"no generation (rollout workers) or learner step finished within {wait_s:.0f} s")
            self._collect_generations()
            self._check_pushes()
            if train_refs and ray.wait(train_refs[:1], timeout=0)[0]:
                # the budget counts training wall clock; held-out evals pause the loop and are excluded
                spent = self.train_seconds + time.perf_counter() - self.t_step
                out_of_time = bool(cfg.time_budget_s) and spent >= cfg.time_budget_s
                last = self._finish_step(train_refs, take_ref, final=out_of_time)
                train_refs = []
                bar.update(1)
                bar.set_postfix(reward=f"{last.get('rollout/reward_mean', 0):.3f}",
                                acc=f"{last.get('eval/accuracy') or float('nan'):.3f}",
                                stale=f"{last.get('off_policy/staleness_max', 0):.0f}")
                if out_of_time:
                    logger.info("time budget of %.0f s reached after %d steps", cfg.time_budget_s, self.version)
                    break
        bar.close()
        _wait([r for _, _, refs in self.pushes for r in refs], rc.weight_push_timeout_s, "final weight push")
        final_dir = self.learner.save_pretrained(str(self.run_dir / "final_model"))
        stats = _wait([w.stats.remote() for w in self.rollout.workers], 60, "rollout stats")
        summary = {**last, "weights/load_seconds_total": sum(s["load_seconds"] for s in stats),
                   "perf/trained_samples_per_s": self.version * cfg.samples_per_step / max(self.train_seconds, 1e-9),
                   "final_model": final_dir}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.metrics_log.close()
        return summary

    def _dispatch(self) -> None:
        """Admission control: send prompts while the staleness budget allows (<= 2 requests per worker)."""
        cfg, rc, P = self.cfg, self.cfg.rollout, self.cfg.prompts_per_step
        limit = min((cfg.buffer.max_staleness + self.version + 1) * P, cfg.num_steps * P)
        while self.dispatched < limit and min(self.rollout.inflight) < 2:
            k = min(rc.prompts_per_request, limit - self.dispatched)
            # the last group of this request is trained at step (d + k - 1) // P at the latest
            min_version = max(0, (self.dispatched + k - 1) // P - cfg.buffer.max_staleness)
            idx = self.rollout.least_loaded()
            keys = [f"g{self.dispatched + i}" for i in range(k)]
            ref = self.rollout.generate_remote(idx, self.cursor.take(k), keys, min_version,
                                               cfg.seed * 100003 + self.dispatched)
            self.inflight[ref] = idx
            self.dispatched += k

    def _collect_generations(self) -> None:
        import ray

        if not self.inflight:
            return
        finished, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=0)
        for ref in finished:
            meta = ray.get(ref)  # re-raises a worker's error here, in the main loop
            self.rollout.done(self.inflight.pop(ref))
            self.ready_groups += int(meta["groups"])
            self.acc["tokens"] += meta["tokens"]
            self.acc["load_seconds"] += meta["load_seconds"]

    def _check_pushes(self) -> None:
        """Retire finished weight pushes; raise if one is past its deadline."""
        import ray

        still = []
        for deadline, version, refs in self.pushes:
            if not ray.wait(refs, num_returns=len(refs), timeout=0)[1]:
                # reloads done on arrival; deferred ones are counted by the next generate call
                self.acc["load_seconds"] += sum(r["load_seconds"] for r in ray.get(refs))
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
        self.version += 1
        buckets_ref, export_ref = self.learner.export_weights_remote(rc.dtype, rc.weight_bucket_bytes)
        self.pushes.append((time.monotonic() + rc.weight_push_timeout_s, self.version,
                            self.rollout.push_weights_remote(self.version, buckets_ref)))
        m.update(ray.get(export_ref, timeout=rc.weight_push_timeout_s))
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
        self.acc = {"tokens": 0.0, "load_seconds": 0.0}
        if final or self.version == cfg.num_steps or (cfg.eval_every and self.version % cfg.eval_every == 0):
            m.update(self.evaluate(self.version))
        self.t_step = time.perf_counter()  # eval time is not step time
        return self.metrics_log.log(self.version, m)


def train(cfg, run_dir: Path, model_path: str, train_problems: list, eval_problems: list,
          progress: bool = True) -> dict:
    """Build a `Trainer` and run it; returns its summary."""
    return Trainer(cfg, run_dir, model_path, train_problems, eval_problems).run(progress)
