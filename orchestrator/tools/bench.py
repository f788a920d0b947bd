"""`relayrl bench CONFIG.toml`: measure relayrl's overheads and its generation/training overlap on one run config.

Benchmarks (``--only`` picks some), run one after the other in one invocation, never two at once:

- ``wrapper``: seconds per generated token of `RolloutWorker.generate` (scoring, `Sample` s, buffer write)
  against the raw `vllm.LLM.generate` that `VLLMEngine` builds, same prompts, seeds and sampling params.
- ``weight_push``: learner export + transfer + rollout reload of the full weights, against a learner step.
- ``overlap`` / ``speedup``: stand-alone generation (G) and training (T) throughput against real runs,
  async (A, ``buffer.max_staleness=1``) and sync (S, ``max_staleness=0``).
- ``scaling``: a real run with 1, 2, 4 SLOWED FAKE rollout workers (a sleep per group, synthetic
  samples) and a real learner on a 2-layer random copy of the model.

Left out on purpose: time to accuracy, a ~1 hour experiment of its own (see ``TTA_NOTE``);
benchmarks in parallel (they would share cores and measure each other).
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.tools.bench_math import (Row, ideal_speedup, learner_busy_frac, overlap_efficiency,
                                           paired_overhead_pct, rate, render, row, run_throughput, to_json)
from orchestrator.tools.bench_actors import FAKE_GROUP_SECONDS, FakeRolloutWorker, RawVLLM, tiny_copy

logger = logging.getLogger(__name__)

WRAPPER_REPEATS = 5  # timed generate calls per side, after one warm-up call each
TRAIN_REPEATS = 2  # timed learner steps on one fixed batch, after one warm-up step
PUSH_REPEATS = 3  # timed weight pushes
SCALING_WORKERS = (1, 2, 4)
TTA_NOTE = ("**Time to accuracy** (async vs sync, and against TRL's GRPOTrainer) is not part of this "
            "command: each system trains the main job for ~18 min, so it is an experiment of its own, "
            "`relayrl experiment deploy/experiments/time_to_accuracy.toml --out docs/time_to_accuracy.md`.")
NOTES = {
    "wrapper": "`wrapper`: both sides are Ray actors with the same options (`num_cpus`, threads, concurrency), "
    "one engine each (the raw side calls `.llm.generate` of a `VLLMEngine`, so the engine arguments are the same by "
    "construction), called in turn (never at once, order alternating) on the same prompts and seeds; "
    f"{WRAPPER_REPEATS} timed calls each after one warm-up, timed from the driver. Raw: prompt encoding + "
    "`LLM.generate`. relayrl: `RolloutWorker.generate`, i.e. also logprob extraction, rewards, `Sample` s and "
    "the write into a replay buffer actor. tokens/s are totals over the timed calls; the overhead is the median "
    "over call pairs (identical prompts and seeds, so identical tokens) of the extra seconds per token.",
    "weight_push": "`weight_push`: `LearnerWorker.export_weights` (rollout dtype, safetensors buckets) then "
    "`RolloutWorker.receive_weights` on every rollout worker, which reloads in place when the engine is idle "
    f"(here it is); median of {PUSH_REPEATS}. GB/s is model bytes over the whole push. The learner step is "
    f"the mean of {TRAIN_REPEATS} `train_step` s on one real batch of `samples_per_step` generated samples.",
    "overlap": "`overlap`: G = samples/s of the rollout workers generating with the learner idle; T = samples/s "
    "of learner steps repeated on one fixed batch; A = samples/s of a real run (`Trainer`, "
    "`buffer.max_staleness=1`, no eval) from its `perf/step_seconds`, step 1 excluded.",
    "speedup": "`speedup`: S = the same run with `buffer.max_staleness=0` (synchronous). The ideal speedup, "
    "full overlap of generation and training, is (1/G + 1/T) / max(1/G, 1/T).",
    "scaling": "`scaling`: **the rollout workers are FAKE**: a `RolloutWorker` whose vLLM engine is replaced by "
    f"a sleep of {FAKE_GROUP_SECONDS:g} s per group returning synthetic answers (num_cpus=0.01 each, the "
    "config minimum is > 0, one group per request, no one-shot demo in the prompt). The loop, buffer, rewards, "
    "weight pushes and learner are real, but the learner trains a 2-layer, 64-wide random model with the "
    "config model's tokenizer. This measures how the orchestrator scales with generators, not vLLM "
    "throughput; efficiency = rate(N) / (N * rate(1)). \"learner busy\" is the share of step time the "
    "learner was computing: near 100% means the learner, not the generators, set the pace.",
}


class _Session:
    """What the benchmarks of one invocation share: config, model, problems, measurements already taken, and
    stand-alone actors (buffer, rollout group, learner group) made on first use and killed before a run."""

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
        self._rig, self._batch, self._sent = None, None, 0

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

    def rig(self) -> tuple:
        """``(buffer, RolloutGroup, LearnerGroup)`` of a `Trainer` that is built but never run (actors as a run
        has them; dynamic sampling off so every generated group can go into a batch)."""
        if self._rig is None:
            from orchestrator.loop import Trainer

            run_dir = self.out_root / f"{Path(self.config_path).stem}-rig-{self.stamp}"  # names its control actor
            cfg = self.variant("buffer.dynamic_sampling=false")
            self._rig = Trainer(cfg, run_dir, self.model_path, self.problems, [])
        return self._rig.buffer, self._rig.rollout, self._rig.learner

    def release(self) -> None:
        """Kill the stand-alone actors and free their resources (before a real run needs the cores)."""
        if self._rig is not None:
            self._rig.shutdown()
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

    def generate(self, num_groups: int) -> list:
        """Generate ``num_groups`` groups on the rig's workers at once (round robin); their metadata."""
        import ray

        rc, workers = self.cfg.rollout, self.rig()[1].workers
        sizes = [min(rc.prompts_per_request, num_groups - i) for i in range(0, num_groups, rc.prompts_per_request)]
        refs = [self.request(workers[i % len(workers)], k) for i, k in enumerate(sizes)]
        return ray.get(refs, timeout=rc.request_timeout_s * len(refs))

    def gen_rate(self) -> float:
        """G, samples/s: the rollout workers generate two steps' worth of groups, the learner idle."""
        self.generate(len(self.rig()[1].workers) * self.cfg.rollout.prompts_per_request)  # warm-up
        t0 = time.perf_counter()
        samples = sum(r.samples for r in self.generate(2 * self.cfg.prompts_per_step))
        return rate(samples, time.perf_counter() - t0)

    def batch(self):
        """ObjectRef of one real learner batch (``prompts_per_step`` generated groups) from the rig's buffer."""
        if self._batch is None:
            import ray

            self.once("generate_samples_per_s", self.gen_rate)  # generating fills the buffer
            buffer, P = self.rig()[0], self.cfg.prompts_per_step
            if ray.get(buffer.size.remote(), timeout=60) < P:  # G was measured on an earlier rig
                self.generate(P)
            self._batch, _ = buffer.take_batch.options(num_returns=2).remote(P, 0, 0)
        return self._batch

    def train_step_seconds(self) -> float:
        """Mean seconds of a learner step (every rank) on one fixed batch, after a warm-up step."""
        import ray

        learner, batch, timeout = self.rig()[2], self.batch(), self.cfg.learner.step_timeout_s
        times = []
        for i in range(TRAIN_REPEATS + 1):
            t0 = time.perf_counter()
            ray.get(learner.train_step_remote(batch, 0), timeout=timeout)
            times += [time.perf_counter() - t0] if i else []
        return statistics.fmean(times)

    def run_rate(self, label: str, *extra: str, model_path: str | None = None, worker_cls: type | None = None) -> float:
        """Trained samples/s of a real `Trainer` run of ``--steps`` steps, eval off (`run_throughput`)."""
        from orchestrator.tools.experiment import read_run
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


def bench_wrapper(s: _Session) -> dict[str, Row]:
    """Tokens/s of raw vLLM and of `RolloutWorker.generate`, and the wrapper's overhead in % of seconds/token."""
    import ray

    from buffer import GenerateRequest, ReplayBuffer
    from rollout.worker import RolloutWorker

    cfg = s.variant("rollout.num_workers=1")
    rc = cfg.rollout
    if ray.cluster_resources().get("CPU", 0.0) + 1e-9 < 2 * rc.num_cpus:
        raise RuntimeError(f"bench wrapper needs 2 x rollout.num_cpus = {2 * rc.num_cpus:g} CPUs; the Ray cluster "
                           f"has {ray.cluster_resources().get('CPU', 0.0):g}")
    # both sides: the same actor options (those RolloutGroup gives its workers), no placement group
    env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(max(1, int(rc.num_cpus)))}}
    opts = dict(num_cpus=rc.num_cpus, num_gpus=rc.gpus_per_worker, max_concurrency=4, runtime_env=env)
    buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote()
    ours = ray.remote(RolloutWorker).options(**opts).remote(rc, cfg.data, s.model_path, 0, buffer)
    raw = ray.remote(RawVLLM).options(**opts).remote(rc, cfg.data, s.model_path)
    calls: dict[str, list] = {"raw": [], "relayrl": []}  # (tokens, seconds) of each timed call
    try:
        for i in range(WRAPPER_REPEATS + 1):  # call 0 warms both up
            problems, keys = s.take(rc.prompts_per_request)
            seed = cfg.seed * 100003 + i
            for side in ("raw", "relayrl") if i % 2 else ("relayrl", "raw"):
                t0 = time.perf_counter()
                if side == "raw":
                    tokens = ray.get(raw.generate.remote(problems, seed), timeout=rc.request_timeout_s)
                else:
                    ref = ours.generate.remote(GenerateRequest(problems, keys, [rc.group_size] * len(keys), 0, seed))
                    tokens = ray.get(ref, timeout=rc.request_timeout_s).tokens
                if i:
                    calls[side].append((tokens, time.perf_counter() - t0))
    finally:
        for actor in (raw, ours, buffer):
            ray.kill(actor)
    s.raw["wrapper"] = {"calls_tokens_seconds": calls}
    raw_tps, ours_tps = (rate(*map(sum, zip(*calls[k]))) for k in ("raw", "relayrl"))
    return {"raw vLLM": row(raw_tps, "tokens/s"), "relayrl RolloutWorker": row(ours_tps, "tokens/s"),
            "overhead (s/token, median of pairs)": row(paired_overhead_pct(calls["raw"], calls["relayrl"]), "%",
                                                       ("<=", 5.0))}


def bench_weight_push(s: _Session) -> dict[str, Row]:
    """Export, reload and whole-push seconds, model bytes, GB/s, and the push as a % of a learner step."""
    import ray

    step_s = s.once("train_step_seconds", s.train_step_seconds)
    _, rollout, learner = s.rig()
    rc, pushes = s.cfg.rollout, []
    for version in range(1, PUSH_REPEATS + 1):
        t0 = time.perf_counter()
        buckets_ref, export_ref = learner.export_weights_remote(rc.dtype, rc.weight_bucket_bytes)
        export = ray.get(export_ref, timeout=rc.weight_push_timeout_s)
        got = ray.get(rollout.push_weights_remote(version, buckets_ref), timeout=rc.weight_push_timeout_s)
        push_s = time.perf_counter() - t0
        # a busy engine stages the weights and reloads before its next request, which reports the time
        deferred = [ray.get(s.request(w, 1), timeout=rc.request_timeout_s)["load_seconds"]
                    for w, g in zip(rollout.workers, got) if not g["applied"]]
        pushes.append({"export_s": export["weights/export_seconds"], "bytes": export["weights/bytes"],
                       "load_s": max([g["load_seconds"] for g in got] + deferred), "push_s": push_s + sum(deferred)})
    s.raw["weight_push"] = {"pushes": pushes, "learner_step_seconds": step_s}
    med = {k: statistics.median(p[k] for p in pushes) for k in pushes[0]}
    return {"model bytes": row(med["bytes"] / 1e6, "MB"), "export (learner)": row(med["export_s"], "s"),
            "reload (rollout)": row(med["load_s"], "s"), "push, export to reloaded": row(med["push_s"], "s"),
            "push bandwidth": row(rate(med["bytes"], med["push_s"]) / 1e9, "GB/s"),
            "learner step": row(step_s, "s"),
            "push / learner step": row(100.0 * med["push_s"] / step_s, "%", ("<=", 10.0))}


def _gen_train_rates(s: _Session) -> tuple[float, float]:
    g = s.once("generate_samples_per_s", s.gen_rate)
    t = s.cfg.samples_per_step / s.once("train_step_seconds", s.train_step_seconds)
    return g, t


def bench_overlap(s: _Session) -> dict[str, Row]:
    """G, T, A in samples/s and the overlap efficiency A / min(G, T)."""
    g, t = _gen_train_rates(s)
    a = s.once("async_samples_per_s", lambda: s.run_rate("async", "buffer.max_staleness=1"))
    return {"G generate only": row(g, "samples/s"), "T train only": row(t, "samples/s"),
            "A async run (staleness 1)": row(a, "samples/s"),
            "overlap efficiency A/min(G,T)": row(overlap_efficiency(a, g, t), "", (">=", 0.9))}


def bench_speedup(s: _Session) -> dict[str, Row]:
    """S in samples/s, speedup A/S, the ideal speedup from G and T, and their ratio."""
    g, t = _gen_train_rates(s)
    a = s.once("async_samples_per_s", lambda: s.run_rate("async", "buffer.max_staleness=1"))
    sync = s.once("sync_samples_per_s", lambda: s.run_rate("sync", "buffer.max_staleness=0"))
    ideal = ideal_speedup(g, t)
    return {"S sync run (staleness 0)": row(sync, "samples/s"), "speedup A/S": row(a / sync, "x"),
            "ideal speedup": row(ideal, "x"), "speedup / ideal": row(a / sync / ideal, "", (">=", 0.9))}


def bench_scaling(s: _Session) -> dict[str, Row]:
    """Trained samples/s of real runs with 1, 2, 4 FAKE rollout workers, and efficiency against linear."""
    s.release()
    tiny = tiny_copy(s.model_path, s.out_root / "tiny_model")
    rates = {n: s.run_rate(f"scaling-{n}", f"rollout.num_workers={n}", "rollout.num_cpus=0.01",
                           "rollout.prompts_per_request=1", "buffer.max_staleness=1", "data.one_shot=false",
                           model_path=tiny, worker_cls=FakeRolloutWorker) for n in SCALING_WORKERS}
    rows = {"FAKE generator capacity, 1 worker": row(s.cfg.rollout.group_size / FAKE_GROUP_SECONDS, "samples/s")}
    for n, r in rates.items():
        rows[f"{n} FAKE workers"] = row(r, "samples/s")
        if n > 1:
            rows[f"{n} FAKE workers, efficiency"] = row(r / (n * rates[1]), "", (">=", 0.9))
        rows[f"{n} FAKE workers, learner busy"] = row(100 * s.raw["runs"][f"scaling-{n}"]["learner_busy_frac"], "%")
    return rows


BENCHMARKS: dict[str, Callable[[_Session], dict[str, Row]]] = {
    "wrapper": bench_wrapper, "weight_push": bench_weight_push, "overlap": bench_overlap,
    "speedup": bench_speedup, "scaling": bench_scaling}


def run_bench(config_path: str, overrides: list[str], out_md: str | None, only: list[str] | None, steps: int,
              command: str, start_ray: Callable) -> str:
    """Run the benchmarks (all, or those in ``only``) in registry order; write ``out_md`` and its ``.json``.

    ``steps`` is the number of learner steps of every real run (step 1 is not counted); ``start_ray(cfg)``
    starts or joins Ray once the config is valid. Returns the Markdown. When a benchmark fails, the files
    still get the rows of those that finished, and a note naming the failure.

    Raises:
        ValueError: an unknown benchmark name (the valid ones are listed), ``steps < 2``, a bad config.
        RuntimeError, TimeoutError: a measurement failed or did not finish in its timeout.
    """
    unknown = sorted(set(only or []) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; valid: {list(BENCHMARKS)}")
    if steps < 2:
        raise ValueError(f"--steps {steps}: runs need at least 2 steps (step 1 is excluded from throughput)")
    s = _Session(config_path, overrides, steps)
    start_ray(s.cfg)
    results: dict[str, dict[str, Row]] = {}
    failure = []
    try:
        for name, bench in BENCHMARKS.items():
            if not only or name in only:
                logger.info("benchmark %s", name)
                results[name] = bench(s)
    except Exception as e:  # what finished is still written down; the error goes on to the CLI
        failure = [f"**Benchmark `{name}` failed** ({type(e).__name__}: {e}); only the rows above finished."]
        raise
    finally:
        s.release()
        notes = [NOTES[n] for n in results] + failure + [TTA_NOTE]
        md = render(results, command, config_path, notes)
        if out_md:
            raw = {**s.raw, "measured": s.measured, "steps": steps}
            Path(out_md).parent.mkdir(parents=True, exist_ok=True)
            Path(out_md).write_text(md)
            Path(out_md).with_suffix(".json").write_text(
                json.dumps(to_json(results, command, config_path, notes, raw), indent=2))
    return md
