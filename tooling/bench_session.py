"""What the benchmarks of one ``relayrl bench`` invocation share: `Session` (config, model, problems, measurements
taken, stand-alone actors) and the measurements more than one benchmark takes (`Session.train_step_seconds`,
`pushes`).

A benchmark names the variant of the run config it measures (``extra`` dotted overrides, ``()`` for the config
as given) on every call; the session keeps one rig (the actors of a built, never run `Trainer`) alive and
rebuilds it when another variant is asked for.

Left out on purpose: the benchmarks themselves (`tooling.bench`, `tooling.bench_training`)
and their arithmetic (`tooling.bench_math`).
"""

from __future__ import annotations

import logging
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from tooling.bench_math import learner_busy_frac, rate, run_throughput

logger = logging.getLogger(__name__)

TRAIN_REPEATS = 2  # timed learner steps on one fixed batch, after one warm-up step
PUSH_REPEATS = 3  # timed weight pushes


class Session:
    """What the benchmarks of one invocation share: config, model, problems, measurements already taken, and
    stand-alone actors (buffer, rollout group, learner group) of one config variant, made on first use and
    killed before a real run or when another variant is asked for."""

    def __init__(self, config_path: str, overrides: list[str], steps: int) -> None:
        from orchestrator.config import load_config
        from orchestrator.models import resolve_model_path
        from rollout.tasks import load_problems

        self.config_path, self.overrides, self.steps = config_path, list(overrides), steps
        self.cfg = load_config(config_path, overrides)
        self.model_path = resolve_model_path(self.cfg.model.path)
        self.problems = load_problems(self.cfg.data, "train")
        self.stamp = time.strftime("%Y%m%d-%H%M%S")
        self.out_root = Path(self.cfg.output_dir) / "bench" / f"{Path(config_path).stem}-{self.stamp}"
        self.measured: dict[str, float] = {}
        self.raw: dict[str, dict] = {}
        self._rig: tuple[tuple[str, ...], object] | None = None  # (variant, its built `Trainer`)
        self._batch, self._sent = None, 0
        self.pushed_version = 0  # pushes carry ever newer versions, so a worker never ignores one

    def variant(self, *extra: str):
        """The run config with ``extra`` dotted overrides on top (validated like any config)."""
        from orchestrator.config import load_config

        return load_config(self.config_path, [*self.overrides, *extra])

    def once(self, key: str, measure: Callable[[], float]) -> float:
        """``measure()`` the first time ``key`` is asked for, the recorded value after."""
        if key not in self.measured:
            self.measured[key] = measure()
            logger.info("measured %s = %.4g", key, self.measured[key])
        return self.measured[key]

    def rig(self, extra: tuple[str, ...] = ()) -> tuple:
        """``(buffer, RolloutGroup, LearnerGroup)`` of a `Trainer` that is built but never run (actors as a run
        has them; dynamic sampling off so every generated group can go into a batch) for the config variant
        ``extra``; asking for another variant replaces the current rig."""
        if self._rig is not None and self._rig[0] != extra:
            self.release()
        if self._rig is None:
            from orchestrator.loop import Trainer

            label = "rig" if not extra else f"rig{abs(hash(extra)) % 10**6}"
            run_dir = self.out_root / f"{Path(self.config_path).stem}-{label}-{self.stamp}"  # names its control actor
            cfg = self.variant("buffer.dynamic_sampling=false", *extra)
            self._rig = (extra, Trainer(cfg, run_dir, self.model_path, self.problems, []))
        trainer = self._rig[1]
        return trainer.buffer, trainer.rollout, trainer.learner

    def release(self) -> None:
        """Kill the stand-alone actors and free their resources (before a real run needs the cores)."""
        if self._rig is not None:
            self._rig[1].shutdown()
        self._rig, self._batch = None, None

    def take(self, k: int) -> tuple[list, list[str]]:
        """The next ``k`` training problems (cycling) and unique group keys."""
        idx = range(self._sent, self._sent + k)
        self._sent += k
        return [self.problems[i % len(self.problems)] for i in idx], [f"b{i}" for i in idx]

    def request(self, worker, num_groups: int):
        """ObjectRef of one generate call of ``num_groups`` new groups on ``worker`` (policy version 0 or newer)."""
        from buffer import GenerateRequest

        problems, keys = self.take(num_groups)
        return worker.generate.remote(GenerateRequest(problems, keys, [self.cfg.rollout.group_size] * len(keys), 0,
                                                      self.cfg.seed + self._sent))

    def generate(self, num_groups: int, extra: tuple[str, ...] = ()) -> list:
        """Generate ``num_groups`` groups at once (round robin) on the workers of the rig of variant ``extra``;
        their metadata."""
        import ray

        rc, workers = self.cfg.rollout, self.rig(extra)[1].workers
        sizes = [min(rc.prompts_per_request, num_groups - i) for i in range(0, num_groups, rc.prompts_per_request)]
        refs = [self.request(workers[i % len(workers)], k) for i, k in enumerate(sizes)]
        return ray.get(refs, timeout=rc.request_timeout_s * len(refs))

    def gen_rate(self, extra: tuple[str, ...] = ()) -> float:
        """G, samples/s: the rollout workers of variant ``extra`` generate two steps' worth of groups, the
        learner idle."""
        self.generate(len(self.rig(extra)[1].workers) * self.cfg.rollout.prompts_per_request, extra)  # warm-up
        t0 = time.perf_counter()
        samples = sum(r.samples for r in self.generate(2 * self.cfg.prompts_per_step, extra))
        return rate(samples, time.perf_counter() - t0)

    def batch(self, extra: tuple[str, ...] = ()):
        """ObjectRef of one real learner batch (``prompts_per_step`` generated groups) from the buffer of the
        rig of variant ``extra``."""
        buffer = self.rig(extra)[0]  # another variant's rig is replaced, and its batch dropped
        if self._batch is None:
            import ray

            self.once("generate_samples_per_s", lambda: self.gen_rate(extra))  # generating fills the buffer
            P = self.cfg.prompts_per_step
            if ray.get(buffer.size.remote(), timeout=60) < P:  # G was measured on an earlier rig
                self.generate(P, extra)
            self._batch, _ = buffer.take_batch.options(num_returns=2).remote(P, 0, 0)
        return self._batch

    def train_step_seconds(self, extra: tuple[str, ...] = ()) -> float:
        """Mean seconds of a learner step (every rank) of variant ``extra`` on one fixed batch, after a
        warm-up step."""
        import ray

        learner, batch, timeout = self.rig(extra)[2], self.batch(extra), self.cfg.learner.step_timeout_s
        times = []
        for i in range(TRAIN_REPEATS + 1):
            t0 = time.perf_counter()
            ray.get(learner.train_step_remote(batch, 0), timeout=timeout)
            times += [time.perf_counter() - t0] if i else []
        return statistics.fmean(times)

    def run_rate(self, label: str, *extra: str, model_path: str | None = None, worker_cls: type | None = None) -> float:
        """Trained samples/s of a real `Trainer` run of ``--steps`` steps, eval off (`run_throughput`)."""
        from tooling.experiment import read_run
        from orchestrator.loop import Trainer

        self.release()
        cfg = self.variant(f"num_steps={self.steps}", "checkpoint.every=0", *extra)
        run_dir = self.out_root / f"{Path(self.config_path).stem}-{label}-{self.stamp}"  # also the control actor name
        run_dir.mkdir(parents=True)
        trainer = Trainer(cfg, run_dir, model_path or self.model_path, self.problems, [], rollout_worker_cls=worker_cls)
        try:
            trainer.run(progress=False)
        finally:
            trainer.shutdown()
        shutil.rmtree(run_dir / "final_model", ignore_errors=True)  # a model copy per run is not needed here
        recs = read_run(run_dir)[0]
        self.raw.setdefault("runs", {})[label] = {"run_dir": str(run_dir), "learner_busy_frac": learner_busy_frac(recs)}
        return run_throughput(recs, cfg.samples_per_step)


def pushes(s: Session, extra: tuple[str, ...] = ()) -> list[dict[str, float]]:
    """``PUSH_REPEATS`` weight pushes on the rig of variant ``extra``: export seconds, bytes, reload and
    whole-push seconds.

    Raises:
        TimeoutError: an export, push or reload did not finish within the rollout config's timeouts.
    """
    import ray

    _, rollout, learner = s.rig(extra)
    rc, out = s.cfg.rollout, []
    for _ in range(PUSH_REPEATS):
        s.pushed_version += 1
        version = s.pushed_version
        t0 = time.perf_counter()
        buckets_ref, export_ref = learner.export_weights_remote(rc.dtype, s.cfg.weights.bucket_bytes)
        export = ray.get(export_ref, timeout=s.cfg.weights.push_timeout_s)
        got = ray.get(rollout.push_weights_remote(version, buckets_ref), timeout=s.cfg.weights.push_timeout_s)
        push_s = time.perf_counter() - t0
        # a busy engine stages the weights and reloads before its next request, which reports the time
        deferred = [ray.get(s.request(w, 1), timeout=rc.request_timeout_s).load_seconds
                    for w, g in zip(rollout.workers, got) if not g["applied"]]
        out.append({"export_s": export["weights/export_seconds"], "bytes": export["weights/bytes"],
                    "load_s": max([g["load_seconds"] for g in got] + deferred), "push_s": push_s + sum(deferred)})
    return out
