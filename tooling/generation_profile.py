"""``python -m tooling.generation_profile --out docs/generation_profile.json``: where the main job's generation
time goes, on its real held-out eval (issue 33).

The prompts are the main job's (``deploy/examples/arithmetic_smollm2.toml``, the config ``make train`` runs): its
``data.eval_size`` held-out problems rendered as the rollout worker renders them (chat template, one-shot demo,
instruction), generated greedily with ``rollout.max_tokens`` tokens each, in one engine call, as
`rollout.worker.RolloutWorker.evaluate` does. Each row runs in a child process of its own, pinned to its first
``threads`` cores (``os.sched_setaffinity``, ``OMP_NUM_THREADS``, ``torch.set_num_threads``), so engine settings
and thread counts cannot leak between rows. Rows:

- ``raw``: a plain `vllm.LLM` built with `rollout.engine_args.engine_args` (the settings under test passed over
  it), one ``LLM.generate`` of the eval prompts' token ids. Then, after ``reset_prefix_cache``, the same prompts
  with ``max_tokens = 1``: that call's seconds are the ``prefill_s`` column, and ``decode_s = total - prefill``
  (with chunked prefill off, as on CPU, prefill is the prompt forward plus one sampled token).
- ``rollout``: the raw engine as above serving `ROLLOUT_REQUESTS` rollout requests one after another, each
  ``rollout.prompts_per_request`` training prompts x ``rollout.group_size`` seeded samples at the run's temperature
  (`rollout.engine.VLLMEngine.generate`'s call): generated tokens per second.
- ``worker``: a `rollout.worker.RolloutWorker` in-process (no Ray; a local replay buffer) with the run config's
  rollout settings (``rollout.num_cpus`` = the row's threads unless the row overrides it), timed over
  ``evaluate`` (episodes, environment, reward function, the engine wrapper): the path the main job's eval takes.

Per row: seconds, generated tokens, prefix-cache hit rate (``vllm:prefix_cache_hits / vllm:prefix_cache_queries``,
in tokens, over the timed call), preemptions (``vllm:num_preemptions``), engine steps (calls of the in-process
``LLMEngine.step``, one scheduler step each) and tokens computed per step. The roofline
(`roofline`) is computed from the model's config, not measured.

Left out on purpose: a test in the suite (each row starts an engine and generates for 10-60 s on 2 cores); the
output is the committed ``docs/generation_profile.json``. Rows are measured one at a time; run it on a quiet
machine (other processes on these cores change every figure).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CONFIG = "deploy/examples/arithmetic_smollm2.toml"
ROW_TIMEOUT_S = 600
MiB = 1 << 20

ROLLOUT_REQUESTS = 8
"""Rollout rows: this many requests of ``rollout.prompts_per_request`` training prompts x ``rollout.group_size``
samples, one after another (a worker serves one request at a time)."""

# name, path (raw | rollout | worker), threads (= cores the row's process may use), block_size (None: the run
# config's), KV cache bytes (None: the run config's; "batch": `_run_row`), and rollout overrides (worker rows; a
# rollout row reads prompts_per_request from them)
DEFAULT_ROWS: list[tuple] = [
    ("raw bs128 kv256M t1", "raw", 1, 128, 256 * MiB),
    ("raw bs128 kvbatch t1", "raw", 1, 128, "batch"),
    ("raw bs32 kv256M t1", "raw", 1, 32, 256 * MiB),
    ("raw bs32 kvbatch t1", "raw", 1, 32, "batch"),
    ("raw bs64 kvbatch t1", "raw", 1, 64, "batch"),
    ("raw bs16 kvbatch t1", "raw", 1, 16, "batch"),
    ("raw bs128 kv256M t2", "raw", 2, 128, 256 * MiB),
    ("raw bs32 kvbatch t2", "raw", 2, 32, "batch"),
    ("rollout bs128 kv256M t1", "rollout", 1, 128, 256 * MiB),
    ("rollout bs32 kv256M t1", "rollout", 1, 32, 256 * MiB),
    # the same 32 prompts as 4 requests of 8 prompts x 8 samples: a larger batch per engine step
    ("rollout bs32 kv256M t1 ppr8", "rollout", 1, 32, 256 * MiB, {"prompts_per_request": 8}),
    ("worker before t1", "worker", 1, 128, 256 * MiB),
    ("worker after t1", "worker", 1, None, None),
    ("worker after t2", "worker", 2, None, None),
    # the main job's worker: rollout.num_cpus = 1 on a 2-core node, 2 threads for the eval while the learner waits
    ("worker after t1 eval2", "worker", 2, None, None, {"num_cpus": 1.0, "eval_num_threads": 2}),
]


def roofline(model_config: dict[str, Any], weight_bytes: int, prompts: int, prompt_tokens: int,
             gen_tokens: int) -> dict[str, Any]:
    """One-core roofline of a dense decoder for this eval, from the model's ``config.json``.

    FLOPs per token ~ 2 x (the matmul weights: attention and MLP projections of every layer plus the LM head,
    vocab x hidden) plus the attention scores and values, 4 x layers x heads x head_dim x context (Kaplan et al.
    2020, "Scaling Laws for Neural Language Models", Table 1: C_forward ~ 2N + 2 n_layer n_ctx d_attn, with QK^T
    and AV both counted here). A decode step reads every weight once (``weight_bytes``, the checkpoint in the
    engine's dtype) however many sequences it carries; with all ``prompts`` sequences decoding together there are
    ``gen_tokens / prompts`` steps. Prefill is compute-bound.

    Assumptions (not measurements; the ``bound_s`` figures scale inversely with them): one core of this AMD EPYC
    (``avx512_bf16``, no AMX) issues one 512-bit ``vdpbf16ps`` per cycle (16 fp32 lanes x 2 bf16 products, each
    multiply and add counted: 64 FLOPs; Zen 4 runs 512-bit ops on 256-bit units) at 3.5 GHz -> 224 GFLOP/s bf16
    peak; a Zen 5 core with full 512-bit units would double it. 10 GB/s of DRAM bandwidth for one core.

    Returns:
        ``{matmul_params, flops_per_token, weight_bytes, kv_bytes_per_token, prefill_flops, decode_flops,
        assumed_peak_flops_per_s, assumed_bandwidth_bytes_per_s, bound_s: {...}}`` (counts, FLOPs, bytes, s).
    """
    h, layers, vocab = model_config["hidden_size"], model_config["num_hidden_layers"], model_config["vocab_size"]
    heads = model_config["num_attention_heads"]
    kv_heads = model_config.get("num_key_value_heads") or heads
    head_dim = model_config.get("head_dim") or h // heads
    per_layer = 2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * model_config["intermediate_size"]
    matmul_params = layers * per_layer + vocab * h  # the LM head multiplies every token, tied or not
    flops_token = 2 * matmul_params
    attn_per_ctx = 4 * layers * heads * head_dim  # FLOPs per token per context position
    mean_prompt = prompt_tokens / prompts
    prefill_flops = prompt_tokens * (flops_token + attn_per_ctx * mean_prompt / 2)
    decode_flops = gen_tokens * (flops_token + attn_per_ctx * (mean_prompt + gen_tokens / prompts / 2))
    peak, bandwidth = 3.5e9 * 64, 10e9
    return {
        "matmul_params": matmul_params, "flops_per_token": flops_token, "weight_bytes": weight_bytes,
        "kv_bytes_per_token": 2 * layers * kv_heads * head_dim * 2,
        "prefill_flops": prefill_flops, "decode_flops": decode_flops,
        "assumed_peak_flops_per_s": peak, "assumed_bandwidth_bytes_per_s": bandwidth,
        "bound_s": {
            "prefill_compute": prefill_flops / peak,
            "decode_compute": decode_flops / peak,
            "decode_weights_all_in_one_batch": gen_tokens / prompts * weight_bytes / bandwidth,
            "decode_weights_one_seq_at_a_time": gen_tokens * weight_bytes / bandwidth,
        },
    }


def run_prompts(config: str, split: str = "eval", limit: int | None = None) -> tuple[list[list[int]], Any]:
    """The run config's ``split`` prompts (at most ``limit``) as the worker renders them, and the config."""
    from transformers import AutoTokenizer

    from orchestrator.config import load_config
    from orchestrator.models import resolve_model_path
    from rollout.tasks import encode_messages, load_problems, prompt_messages

    cfg = load_config(config)
    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model.path))
    d = cfg.data
    problems = load_problems(d, split)[:limit]
    return [encode_messages(tok, prompt_messages(p, d.instruction, d.one_shot, d.system_prompt)) for p in problems], cfg


def _metrics(llm) -> dict[str, float]:
    """The engine's counters this profile reads, as plain numbers (histograms: ``name:sum`` / ``name:count``)."""
    out: dict[str, float] = {}
    for m in llm.get_metrics():
        if hasattr(m, "sum") and hasattr(m, "count"):
            out[m.name + ":sum"], out[m.name + ":count"] = float(m.sum), float(m.count)
        elif isinstance(getattr(m, "value", None), (int, float)):
            out[m.name] = float(m.value)
    return out


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _summary(d: dict[str, float]) -> dict[str, float | None]:
    q = d.get("vllm:prefix_cache_queries", 0.0)
    return {"prefix_hit_rate": d.get("vllm:prefix_cache_hits", 0.0) / q if q else None,
            "preemptions": d.get("vllm:num_preemptions")}


def _count_steps(llm) -> list[int]:
    """Count ``llm``'s engine steps (in-process: one ``LLMEngine.step`` is one scheduler step); returns the
    counter, a one-item list that grows as the engine steps."""
    engine, steps = llm.llm_engine, [0]
    step = engine.step

    def counted(*args, **kwargs):
        steps[0] += 1
        return step(*args, **kwargs)

    engine.step = counted
    return steps


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One row, in this (child) process; ``spec`` as `_run_row` writes it."""
    import torch

    torch.set_num_threads(spec["threads"])
    from orchestrator.config import load_config
    from orchestrator.models import resolve_model_path

    cfg = load_config(spec["config"])
    model = resolve_model_path(cfg.model.path)
    prompts = spec["prompts"]
    rc = cfg.rollout
    row: dict[str, Any] = {k: spec[k] for k in ("name", "path", "threads", "block_size", "kv_cache_memory_bytes")}
    if spec.get("over"):
        row["rollout_overrides"] = spec["over"]
    if spec["path"] in ("raw", "rollout"):
        from vllm import LLM, SamplingParams

        from rollout.engine_args import engine_args, engine_env

        for k, v in engine_env("cpu").items():
            os.environ.setdefault(k, v)
        extra = {"block_size": spec["block_size"]} if spec["block_size"] else {}
        t0 = time.perf_counter()
        llm = LLM(**engine_args("cpu", model, rc.dtype, spec["kv_cache_memory_bytes"], rc.max_model_len, rc.seed,
                                disable_log_stats=False, **extra))
        row["engine_start_s"] = time.perf_counter() - t0
        llm.generate([{"prompt_token_ids": prompts[0][:16]}], SamplingParams(max_tokens=1), use_tqdm=False)
        steps = _count_steps(llm)
        row["block_size_used"] = llm.llm_engine.vllm_config.cache_config.block_size
        if spec["path"] == "rollout":
            k = spec.get("over", {}).get("prompts_per_request", rc.prompts_per_request)
            before = _metrics(llm)
            t0, gen = time.perf_counter(), 0
            for i in range(0, len(prompts), k):
                params = SamplingParams(n=rc.group_size, max_tokens=rc.max_tokens, temperature=rc.temperature,
                                        logprobs=0, seed=rc.seed + i)
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts[i:i + k]], params, use_tqdm=False)
                gen += sum(len(c.token_ids) for o in outs for c in o.outputs)
            row["total_s"] = time.perf_counter() - t0
            row.update(_summary(_delta(_metrics(llm), before)), generated_tokens=gen, engine_steps=steps[0],
                       requests=-(-len(prompts) // k), samples=len(prompts) * rc.group_size,
                       tokens_per_s=gen / row["total_s"])
            return row
        reqs = [{"prompt_token_ids": p} for p in prompts]
        for what, max_tokens in (("total", spec["max_tokens"]), ("prefill", 1)):
            llm.reset_prefix_cache()
            before, steps[0] = _metrics(llm), 0
            t0 = time.perf_counter()
            outs = llm.generate(reqs, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False)
            row[f"{what}_s"] = time.perf_counter() - t0
            stats = _summary(_delta(_metrics(llm), before))
            if what == "total":
                row.update(stats)
                row["generated_tokens"] = sum(len(o.outputs[0].token_ids) for o in outs)
                row["cached_prompt_tokens"] = sum(o.num_cached_tokens or 0 for o in outs)
                row["engine_steps"] = steps[0]
                computed = sum(map(len, prompts)) - row["cached_prompt_tokens"] + row["generated_tokens"]
                row["tokens_per_step"] = computed / steps[0]
            else:
                row["prefill_engine_steps"] = steps[0]
                row["prefill_prefix_hit_rate"] = stats["prefix_hit_rate"]
        row["decode_s"] = row["total_s"] - row["prefill_s"]
        return row
    import rollout.engine
    from buffer import ReplayBuffer
    from rollout.tasks import load_problems
    from rollout.worker import RolloutWorker

    args_of = rollout.engine.engine_args  # the worker's own engine arguments, with vLLM's counters on (as in raw rows)
    rollout.engine.engine_args = lambda *a, **k: {**args_of(*a, **k), "disable_log_stats": False}

    over: dict[str, Any] = {"num_cpus": float(spec["threads"]), **spec.get("over", {})}
    if spec["kv_cache_memory_bytes"] is not None:
        over["kv_cache_memory_bytes"] = spec["kv_cache_memory_bytes"]
    if "block_size" in type(rc).model_fields:
        over["block_size"] = spec["block_size"]
    rc = rc.model_copy(update=over)
    t0 = time.perf_counter()
    worker = RolloutWorker(rc, cfg.data, model, 0, ReplayBuffer())
    row["engine_start_s"] = time.perf_counter() - t0
    engine = worker.engine.llm
    row["block_size_used"] = engine.llm_engine.vllm_config.cache_config.block_size
    row["kv_cache_memory_bytes"] = engine.llm_engine.vllm_config.cache_config.kv_cache_memory_bytes
    problems = load_problems(cfg.data, "eval")
    engine.reset_prefix_cache()
    steps = _count_steps(engine)
    before = _metrics(engine)
    t0 = time.perf_counter()
    correct = worker.evaluate(problems, 0, cfg.eval_max_tokens or rc.max_tokens)
    row["total_s"] = time.perf_counter() - t0
    row["engine_steps"] = steps[0]
    row.update(_summary(_delta(_metrics(engine), before)))
    row["accuracy"] = sum(correct) / len(correct)
    return row


def _run_row(name: str, path: str, threads: int, block_size: int | None, kv: int | str | None,
             over: dict[str, Any] | None = None, *, prompts: list[list[int]], cfg: Any, config: str,
             kv_per_token: int) -> dict[str, Any]:
    """Measure one row in a child process pinned to cores ``0..threads-1``; an error row on failure.
    ``kv = "batch"``: a KV cache that holds every prompt with its ``max_tokens`` at once, in whole blocks of the
    row's size (`rollout.engine_args.batch_kv_cache_bytes`)."""
    from rollout.engine_args import CPU_BLOCK_SIZE, batch_kv_cache_bytes

    max_tokens = cfg.eval_max_tokens or cfg.rollout.max_tokens
    if kv == "batch":
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        kv = batch_kv_cache_bytes(kv_per_token, len(prompts), max(map(len, prompts)) + max_tokens,
                                  block_size or CPU_BLOCK_SIZE, ram)
    spec = {"name": name, "path": path, "threads": threads, "block_size": block_size, "config": config,
            "kv_cache_memory_bytes": kv, "prompts": prompts, "over": over or {},
            "max_tokens": max_tokens}
    cores = sorted(os.sched_getaffinity(0))[:threads]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "TORCHDYNAMO_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory(prefix="relayrl-genprof-") as d:
        spec_path, out_path = Path(d, "spec.json"), Path(d, "row.json")
        spec_path.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-m", "tooling.generation_profile", "--child", str(spec_path),
                                   str(out_path)], env=env, capture_output=True, text=True, timeout=ROW_TIMEOUT_S,
                                  preexec_fn=lambda: os.sched_setaffinity(0, cores))
        except subprocess.TimeoutExpired:
            return {"name": name, "error": f"timed out after {ROW_TIMEOUT_S} s"}
        if proc.returncode != 0 or not out_path.exists():
            err = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error" in ln][-1:] or \
                proc.stderr.splitlines()[-1:]
            return {"name": name, "error": (err[0] if err else f"exit {proc.returncode}")[:300]}
        row = json.loads(out_path.read_text())
        row["process_s"] = time.perf_counter() - t0
        return row


def table(result: dict[str, Any]) -> str:
    """The rows of a profile as a markdown table (what docs/generation_profile.md shows)."""
    def f(v, spec=".1f"):
        return "" if v is None else format(v, spec)

    lines = ["| row | threads | block | KV MiB | seconds | prefill s | decode s | prefix hit | preemptions | "
             "engine steps | tokens/s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | refused: {r['error']} | | | | | | |")
            continue
        kv = r.get("kv_cache_memory_bytes")
        tps = r.get("tokens_per_s") or (r["generated_tokens"] / r["total_s"] if r.get("generated_tokens") else None)
        over = r.get("rollout_overrides") or {}
        threads = (f"{over['num_cpus']:g} + eval {over['eval_num_threads']}" if "eval_num_threads" in over
                   else r["threads"])
        lines.append(f"| {r['name']} | {threads} | {r.get('block_size_used')} | {f(kv and kv / MiB, '.0f')} | "
                     f"{f(r['total_s'])} | {f(r.get('prefill_s'))} | {f(r.get('decode_s'))} | "
                     f"{f(r.get('prefix_hit_rate'), '.2f')} | {f(r.get('preemptions'), '.0f')} | "
                     f"{r.get('engine_steps', '')} | {f(tps, '.0f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure the rows (all, or those whose names contain an ``--only`` string) and write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="docs/generation_profile.json")
    p.add_argument("--config", default=CONFIG, help="run config whose held-out eval is profiled")
    p.add_argument("--only", action="append", default=[], help="measure rows whose name contains this (repeatable)")
    p.add_argument("--merge", action="store_true", help="keep rows already in --out that this run does not measure")
    p.add_argument("--table", action="store_true", help="print --out's rows as a markdown table; measure nothing")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.table:
        print(table(json.loads(Path(a.out).read_text())))  # noqa: T201 (the table is this command's output)
        return 0
    if a.child:
        spec = json.loads(Path(a.child[0]).read_text())
        Path(a.child[1]).write_text(json.dumps(_child(spec)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from orchestrator.models import resolve_model_path
    from rollout.engine_args import kv_bytes_per_token, model_config

    prompts, cfg = run_prompts(a.config)
    rc = cfg.rollout
    train_prompts, _ = run_prompts(a.config, "train", ROLLOUT_REQUESTS * rc.prompts_per_request)
    model = resolve_model_path(cfg.model.path)
    mcfg = model_config(model)
    max_tokens = cfg.eval_max_tokens or cfg.rollout.max_tokens
    per_token = kv_bytes_per_token(mcfg, cfg.rollout.dtype)
    shared = 0
    while all(len(q) > shared and q[shared] == prompts[0][shared] for q in prompts):
        shared += 1
    out = Path(a.out)
    old = json.loads(out.read_text()) if a.merge and out.exists() else {}
    rows = {r["name"]: r for r in old.get("rows", [])}
    for spec in DEFAULT_ROWS:
        if a.only and not any(s in spec[0] for s in a.only):
            continue
        logger.info("measuring %s", spec[0])
        row = _run_row(*spec, prompts=train_prompts if spec[1] == "rollout" else prompts, cfg=cfg, config=a.config,
                       kv_per_token=per_token)
        row["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        logger.info("%s", json.dumps(row))
        rows[spec[0]] = row
    import torch
    from safetensors import safe_open

    from rollout.engine_args import checkpoint_files

    n_params = 0
    for f in checkpoint_files(model):
        with safe_open(f, framework="pt") as sf:
            n_params += sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[cfg.rollout.dtype]
    gen = next((r["generated_tokens"] for r in rows.values() if r.get("path") == "raw" and "generated_tokens" in r), 0)
    order = [s[0] for s in DEFAULT_ROWS]
    result = {
        "config": a.config, "prompts": len(prompts), "prompt_tokens": sum(map(len, prompts)),
        "prompt_tokens_max": max(map(len, prompts)), "shared_prefix_tokens": shared, "max_tokens": max_tokens,
        "kv_bytes_per_token": per_token, "cpu_count": os.cpu_count(),
        "roofline": roofline(mcfg, n_params * torch.finfo(dt).bits // 8, len(prompts), sum(map(len, prompts)), gen),
        "parameters": n_params,
        "rows": sorted(rows.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order)),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
