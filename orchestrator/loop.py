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


def _wait(refs: list, timeout: float, what: str):
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    if len(ready) < len(refs):
        raise TimeoutError(f"{what} did not finish within {timeout:.0f} s")
    return ray.get(refs)


class Trainer:
    """Owns the actors of one run (buffer, learner group, rollout group) and runs the loop.

    Construction starts every actor and waits until they are up; `run` trains; the actors stay
    alive afterwards so callers (tests, benchmarks) can inspect them.

    Raises:
        RuntimeError: the cluster cannot host the actors.
    """

    def __init__(self, cfg, run_dir: Path, model_path: str, train_problems: list, eval_problems: list) -> None:
        import ray

        from buffer import ReplayBuffer
        from learner.group import LearnerGroup
        from rollout.worker import RolloutGroup

        self.cfg, self.run_dir, self.eval_problems = cfg, Path(run_dir), eval_problems
        self.buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote(cfg.buffer.max_staleness)
        self.learner = LearnerGroup(cfg.learner, model_path, cfg.samples_per_step, cfg.rollout.temperature, cfg.seed)
        self.rollout = RolloutGroup(cfg.rollout, cfg.data, model_path, self.buffer)
        self.cursor = PromptCursor(train_problems, cfg.seed)
        self.version = 0

    def evaluate(self, version: int) -> dict[str, float]:
        """Greedy held-out accuracy (strict exact match) with weights of ``version`` or newer."""
        if not self.eval_problems:
            return {}
        rc = self.cfg.rollout
        t0 = time.perf_counter()
        acc = self.rollout.evaluate(self.eval_problems, version, self.cfg.eval_max_tokens or rc.max_tokens,
                                    rc.request_timeout_s * max(1, len(self.eval_problems)))
        return {"eval/accuracy": acc, "eval/seconds": time.perf_counter() - t0}

    def run(self, progress: bool = True) -> dict:
        """Train ``cfg.num_steps`` steps; returns the summary (last metrics record + totals).

        Raises:
            TimeoutError: a generation, learner step or weight push exceeded its timeout.
        """
        import ray
        from tqdm import tqdm

        from orchestrator.metrics import MetricsLogger

        cfg, rollout, learner, buffer, cursor = self.cfg, self.rollout, self.learner, self.buffer, self.cursor
        rc, P = cfg.rollout, cfg.prompts_per_step
        metrics_log = MetricsLogger(self.run_dir)
        evaluate = self.evaluate
        last = metrics_log.log(0, evaluate(0))
        logger.info("step 0: held-out accuracy %s", last.get("eval/accuracy"))
        version, dispatched, ready_groups, gen_tokens = 0, 0, 0, 0.0
        inflight: dict = {}  # generate ref -> worker index
        train_refs: list = []
        pushes: list = []  # (deadline, version, refs)
        t_step = time.perf_counter()
        bar = tqdm(total=cfg.num_steps, disable=not progress, desc="train", unit="step")
        while version < cfg.num_steps:
            # 1. Keep generators busy within the staleness budget (two requests queued per worker).
            limit = min((cfg.buffer.max_staleness + version + 1) * P, cfg.num_steps * P)
            while dispatched < limit and min(rollout.inflight) < 2:
                k = min(rc.prompts_per_request, limit - dispatched)
                need = (dispatched + k - 1) // P - cfg.buffer.max_staleness
                idx = rollout.least_loaded()
                probs = cursor.take(k)
                keys = [f"g{dispatched + i}" for i in range(k)]
                inflight[rollout.generate_remote(idx, probs, keys, max(0, need), cfg.seed * 100003 + dispatched)] = idx
                dispatched += k
            # 2. Train when a batch is ready and the learner is idle.
            if not train_refs and ready_groups >= P:
                batch_ref, take_metrics_ref = buffer.take_batch.options(num_returns=2).remote(P, version)
                train_refs = learner.train_step_remote(batch_ref, version)
                ready_groups -= P
            # 3. Wait for the next event.
            waitable = list(inflight) + train_refs[:1]
            done, _ = ray.wait(waitable, num_returns=1, timeout=rc.request_timeout_s)
            if not done:
                raise TimeoutError(f"no generation or learner step finished within {rc.request_timeout_s:.0f} s")
            finished, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=0) if inflight else ([], [])
            for ref in finished:
                meta = ray.get(ref)
                rollout.done(inflight.pop(ref))
                ready_groups += int(meta["groups"])
                gen_tokens += meta["tokens"]
            now = time.monotonic()
            for deadline, v, refs in pushes:
                if now > deadline and ray.wait(refs, num_returns=len(refs), timeout=0)[1]:
                    raise TimeoutError(f"weight push of policy version {v} to the rollout workers did not "
                                       f"finish within {rc.weight_push_timeout_s:.0f} s")
            pushes = [p for p in pushes if ray.wait(p[2], num_returns=len(p[2]), timeout=0)[1]]
            if train_refs and ray.wait(train_refs[:1], timeout=0)[0]:
                step_metrics = learner.merge_metrics(_wait(train_refs, cfg.learner.step_timeout_s, "learner step"))
                step_metrics.update(ray.get(take_metrics_ref, timeout=60))
                train_refs = []
                version += 1
                buckets_ref, export_ref = learner.export_weights_remote(rc.dtype, rc.weight_bucket_bytes)
                pushes.append((time.monotonic() + rc.weight_push_timeout_s, version,
                               rollout.push_weights_remote(version, buckets_ref)))
                step_metrics.update(ray.get(export_ref, timeout=rc.weight_push_timeout_s))
                elapsed = time.perf_counter() - t_step
                t_step = time.perf_counter()
                step_metrics.update({
                    "perf/step_seconds": elapsed,
                    "perf/rollout_tokens_per_s": gen_tokens / elapsed,
                    "perf/learner_tokens_per_s": step_metrics["learner/tokens"] / max(step_metrics["learner/seconds"], 1e-9),
                    "policy/version": float(version),
                })
                gen_tokens = 0.0
                if version == cfg.num_steps or (cfg.eval_every and version % cfg.eval_every == 0):
                    step_metrics.update(evaluate(version))
                last = metrics_log.log(version, step_metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{step_metrics.get('rollout/reward_mean', 0):.3f}",
                                acc=f"{step_metrics.get('eval/accuracy', float('nan')):.3f}",
                                stale=f"{step_metrics.get('off_policy/staleness_max', 0):.0f}")
        bar.close()
        _wait([r for _, _, refs in pushes for r in refs], rc.weight_push_timeout_s, "final weight push")
        final_dir = learner.save_pretrained(str(self.run_dir / "final_model"))
        stats = _wait([w.stats.remote() for w in rollout.workers], 60, "rollout stats")
        summary = {**last, "weights/load_seconds_total": sum(s["load_seconds"] for s in stats),
                   "final_model": final_dir}
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        metrics_log.close()
        self.version = version
        return summary


def train(cfg, run_dir: Path, model_path: str, train_problems: list, eval_problems: list,
          progress: bool = True) -> dict:
    """Build a `Trainer` and run it; returns its summary."""
    return Trainer(cfg, run_dir, model_path, train_problems, eval_problems).run(progress)
