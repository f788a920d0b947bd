"""`relayrl bench CONFIG.toml`: measure relayrl's overheads and its generation/training overlap on one run config.

Benchmarks (``--only`` picks some), run one after the other in one invocation, never two at once:

- ``wrapper``: seconds per generated token of `RolloutWorker.generate` (scoring, `Sample` s, buffer write)
  against the raw `vllm.LLM.generate` that `VLLMEngine` builds, same prompts, seeds and sampling params.
- ``generation``: the same calls as tokens/s per core, side by side, and the seconds of a held-out eval of the
  config's ``data.eval_size`` problems as a run evaluates them (`tooling.bench_generation`).
- ``weight_push``: learner export + transfer + rollout reload of the full weights, against a learner step.
- ``weight_push_delta``: bytes and seconds per push, delta (``weights.type = "delta"``) against full, between
  real consecutive learner versions (`tooling.bench_delta`).
- ``lora``: LoRA (``learner.lora``, adapter-only pushes) against full fine-tuning, side by side: bytes and
  seconds per push, learner step seconds, peak learner memory.
- ``learner_paths``: the learner step on one real batch with ``learner.shared_prefix`` off (one padded row per
  sample) and on (one packed row per prompt): seconds, trained tokens/s, peak learner memory.
- ``learner_layouts``: one micro-batch's forward + backward as padded rows, as a shared-prefix row and as the
  default picks by cost, for short and long responses (`tooling.bench_layouts`; no Ray).
- ``learner_memory``: peak host memory of each of 2 learner ranks under ZeRO-1, 2 and 3, at start, during a train
  step and during a weight export (`tooling.bench_memory`; idle rollout workers).
- ``learner_snapshot``: the learner step without and with a failover snapshot after every step, the snapshot's
  hold and size, and one failover's seconds (`tooling.bench_snapshot`; idle rollout workers).
- ``overlap`` / ``speedup``: stand-alone generation (G) and training (T) throughput against real runs,
  async (A, ``buffer.max_staleness=1``) and sync (S, ``max_staleness=0``); the async run's learner wait
  fraction (``perf/learner_wait_frac``) per step.
- ``scaling``: a real run with 1, 2, 4 SLOWED FAKE rollout workers (a sleep per group, synthetic
  samples) and a real learner on a 2-layer random copy of the model.

The session the benchmarks share is `tooling.bench_session`; ``lora`` and ``learner_paths`` live in
`tooling.bench_training`.

Left out on purpose: time to accuracy, a ~1 hour experiment of its own (see ``TTA_NOTE``);
benchmarks in parallel (they would share cores and measure each other).
"""

from __future__ import annotations

import json
import logging
import statistics
from collections.abc import Callable
from pathlib import Path

from tooling import bench_delta, bench_generation, bench_layouts, bench_memory, bench_snapshot, bench_training
from tooling.bench_actors import FAKE_GROUP_SECONDS, FakeRolloutWorker, tiny_copy
from tooling.bench_generation import WRAPPER_REPEATS
from tooling.bench_math import (Row, ideal_speedup, overlap_efficiency, paired_overhead_pct, rate, render,
                                           row, spread_row, to_json)
from tooling.bench_session import PUSH_REPEATS, TRAIN_REPEATS, Session, pushes

logger = logging.getLogger(__name__)

SCALING_WORKERS = (1, 2, 4)
TTA_NOTE = ("**Time to accuracy** (async vs sync, and against TRL's GRPOTrainer) is not part of this "
            "command: each system trains the main job for ~12-18 min, so it is an experiment of its own, "
            "`relayrl experiment deploy/experiments/time_to_accuracy.toml --out docs/time_to_accuracy.md`.")
NOTES = {
    "wrapper": "`wrapper`: both sides are Ray actors with the same options (`num_cpus`, threads, concurrency), "
    "one engine each (the raw side calls `.llm.generate` of a `VLLMEngine`, so the engine arguments are the same by "
    "construction), called in turn (never at once, order alternating) on the same prompts and seeds; "
    f"{WRAPPER_REPEATS} timed calls each after one warm-up, timed from the driver. Raw: prompt encoding + "
    "`LLM.generate`. relayrl: `RolloutWorker.generate`, i.e. also logprob extraction, rewards, `Sample` s and "
    "the write into a replay buffer actor. tokens/s are totals over the timed calls; the overhead is the median "
    "over call pairs (identical prompts and seeds, so identical tokens, unless a call holds one prompt twice: the "
    "rollout worker samples those groups as one request of 2n, raw vLLM as two requests of n with the same seed, "
    "that is twice the same n answers) of the extra seconds per token.",
    "weight_push": "`weight_push`: `LearnerWorker.export_weights` (rollout dtype, safetensors buckets) then "
    "`RolloutWorker.receive_weights` on every rollout worker, which reloads in place when the engine is idle "
    f"(here it is); median of {PUSH_REPEATS}. GB/s is model bytes over the whole push. The learner step is "
    f"the mean of {TRAIN_REPEATS} `train_step` s on one real batch of `samples_per_step` generated samples.",
    "generation": bench_generation.NOTE,
    "weight_push_delta": bench_delta.NOTE,
    **bench_training.NOTES,
    "learner_layouts": bench_layouts.NOTE,
    "learner_memory": bench_memory.NOTE,
    "learner_snapshot": bench_snapshot.NOTE,
    "overlap": "`overlap`: G = samples/s of the rollout workers generating with the learner idle; T = samples/s "
    "of learner steps repeated on one fixed batch; A = samples/s of a real run (`Trainer`, "
    "`buffer.max_staleness=1`, no eval) from its `perf/step_seconds`, step 1 excluded. Learner wait: that run's "
    "`perf/learner_wait_frac` (the share of a step the learner spent waiting for a batch), one value per step "
    "from step 2.",
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


def bench_wrapper(s: Session) -> dict[str, Row]:
    """Tokens/s of raw vLLM and of `RolloutWorker.generate`, and the wrapper's overhead in % of seconds/token
    (the calls of `tooling.bench_generation.wrapper_calls`)."""
    calls = bench_generation.wrapper_calls(s)
    raw_tps, ours_tps = (rate(*map(sum, zip(*calls[k]))) for k in ("raw", "relayrl"))
    return {"raw vLLM": row(raw_tps, "tokens/s"), "relayrl RolloutWorker": row(ours_tps, "tokens/s"),
            "overhead (s/token, median of pairs)": row(paired_overhead_pct(calls["raw"], calls["relayrl"]), "%",
                                                       ("<=", 5.0))}


def bench_weight_push(s: Session) -> dict[str, Row]:
    """Export, reload and whole-push seconds, model bytes, GB/s, and the push as a % of a learner step."""
    step_s = s.once("train_step_seconds", s.train_step_seconds)
    done = pushes(s)
    s.raw["weight_push"] = {"pushes": done, "learner_step_seconds": step_s}
    med = {k: statistics.median(p[k] for p in done) for k in done[0]}
    return {"model bytes": row(med["bytes"] / 1e6, "MB"), "export (learner)": row(med["export_s"], "s"),
            "reload (rollout)": row(med["load_s"], "s"), "push, export to reloaded": row(med["push_s"], "s"),
            "push bandwidth": row(rate(med["bytes"], med["push_s"]) / 1e9, "GB/s"),
            "learner step": row(step_s, "s"),
            "push / learner step": row(100.0 * med["push_s"] / step_s, "%", ("<=", 10.0))}


def _gen_train_rates(s: Session) -> tuple[float, float]:
    g = s.once("generate_samples_per_s", s.gen_rate)
    t = s.cfg.samples_per_step / s.once("train_step_seconds", s.train_step_seconds)
    return g, t


def bench_overlap(s: Session) -> dict[str, Row]:
    """G, T, A in samples/s, the overlap efficiency A / min(G, T), and the async run's learner wait fraction
    per step (target <= 10%: issue 33)."""
    g, t = _gen_train_rates(s)
    a = s.once("async_samples_per_s", lambda: s.run_rate("async", "buffer.max_staleness=1"))
    wait = s.raw["runs"]["async"]["learner_wait_frac"]
    return {"G generate only": row(g, "samples/s"), "T train only": row(t, "samples/s"),
            "A async run (staleness 1)": row(a, "samples/s"),
            "overlap efficiency A/min(G,T)": row(overlap_efficiency(a, g, t), "", (">=", 0.9)),
            "learner wait, async run (per step)": spread_row([100 * w for w in wait], "% of step", ("<=", 10.0))}


def bench_speedup(s: Session) -> dict[str, Row]:
    """S in samples/s, speedup A/S, the ideal speedup from G and T, and their ratio."""
    g, t = _gen_train_rates(s)
    a = s.once("async_samples_per_s", lambda: s.run_rate("async", "buffer.max_staleness=1"))
    sync = s.once("sync_samples_per_s", lambda: s.run_rate("sync", "buffer.max_staleness=0"))
    ideal = ideal_speedup(g, t)
    return {"S sync run (staleness 0)": row(sync, "samples/s"), "speedup A/S": row(a / sync, "x"),
            "ideal speedup": row(ideal, "x"), "speedup / ideal": row(a / sync / ideal, "", (">=", 0.9))}


def bench_scaling(s: Session) -> dict[str, Row]:
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


BENCHMARKS: dict[str, Callable[[Session], dict[str, Row]]] = {
    "wrapper": bench_wrapper, "generation": bench_generation.bench_generation, "weight_push": bench_weight_push,
    "weight_push_delta": bench_delta.bench_weight_push_delta, "lora": bench_training.bench_lora,
    "learner_paths": bench_training.bench_learner_paths, "learner_layouts": bench_layouts.bench_learner_layouts,
    "learner_memory": bench_memory.bench_learner_memory, "learner_snapshot": bench_snapshot.bench_learner_snapshot,
    "overlap": bench_overlap,
    "speedup": bench_speedup, "scaling": bench_scaling}


def git_state() -> dict[str, object]:
    """``{"commit": short HEAD, with "+dirty" when tracked files have uncommitted changes, "dirty_files": [...]}``
    of the working tree the benchmarks run from; ``"unknown"`` outside a git checkout."""
    import subprocess

    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
        return out.stdout.rstrip("\n") if out.returncode == 0 else ""  # porcelain lines start with a space

    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": head + ("+dirty" if dirty else ""), "dirty_files": dirty}


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
    s = Session(config_path, overrides, steps)
    git = git_state()
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
        commit = (f"Measured at git commit {git['commit']}" + (
            f" (uncommitted changes in {len(git['dirty_files'])} tracked files, listed in the JSON)."
            if git["dirty_files"] else "."))
        notes = [NOTES[n] for n in results] + failure + [TTA_NOTE, commit]
        md = render(results, command, config_path, notes)
        if out_md:
            raw = {**s.raw, "measured": s.measured, "steps": steps, "dirty_files": git["dirty_files"]}
            Path(out_md).parent.mkdir(parents=True, exist_ok=True)
            Path(out_md).write_text(md)
            Path(out_md).with_suffix(".json").write_text(
                json.dumps({**to_json(results, command, config_path, notes, raw), "commit": git["commit"]}, indent=2))
    return md
