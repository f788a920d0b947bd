"""vLLM engine arguments and environment per platform (rollout.engine_args), and the config fields behind them."""

from __future__ import annotations

import pytest

from orchestrator.config import ConfigError, load_config
from rollout.engine_args import engine_args, engine_env

COMMON = dict(model_path="/m", dtype="bfloat16", kv_cache_memory_bytes=64 << 20, max_model_len=256, seed=3)


def test_cpu_keeps_its_workarounds():
    args = engine_args("cpu", **COMMON, gpu_memory_utilization=0.5)
    assert args["enforce_eager"] is True and args["enable_chunked_prefill"] is False
    assert args["kv_cache_memory_bytes"] == 64 << 20 and "gpu_memory_utilization" not in args
    assert args["tensor_parallel_size"] == 1 and "distributed_executor_backend" not in args
    assert args["logprobs_mode"] == "processed_logprobs" and args["model"] == "/m" and args["seed"] == 3
    # the engine in-process; no TorchDynamo tracing of vLLM's sampler ops on the first request
    assert engine_env("cpu") == {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TORCHDYNAMO_DISABLE": "1"}


def test_cuda_uses_graphs_chunked_prefill_and_a_memory_fraction():
    args = engine_args("cuda", **COMMON, gpu_memory_utilization=0.5)
    assert args["enforce_eager"] is False and args["enable_chunked_prefill"] is True
    assert args["gpu_memory_utilization"] == 0.5 and "kv_cache_memory_bytes" not in args
    assert args["logprobs_mode"] == "processed_logprobs" and args["enable_prefix_caching"] is True
    env = engine_env("cuda")
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env  # the engine core keeps its own process
    assert "TORCHDYNAMO_DISABLE" not in env  # CUDA graphs and compiled sampler ops stay
    assert env["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"  # so collective_rpc may send the reload function


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_tensor_parallel_ranks_run_under_the_multiprocessing_executor(platform):
    args = engine_args(platform, **COMMON, tensor_parallel_size=4)
    assert args["tensor_parallel_size"] == 4 and args["distributed_executor_backend"] == "mp"


def test_cpu_tensor_parallel_ranks_get_disjoint_cores():
    assert engine_env("cpu", 2, [0, 1])["VLLM_CPU_OMP_THREADS_BIND"] == "0|1"
    assert engine_env("cpu", 2, [3, 2, 5, 4, 6])["VLLM_CPU_OMP_THREADS_BIND"] == "2,3,4|5,6"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in engine_env("cpu", 1, [0, 1])
    with pytest.raises(ValueError, match=r"tensor_parallel_size = 3 on CPU needs a core per rank.*1 core"):
        engine_env("cpu", 3, [0])


def test_extra_arguments_pass_through_and_win():
    args = engine_args("cuda", **COMMON, enable_lora=True, max_lora_rank=8, enforce_eager=True)
    assert args["enable_lora"] is True and args["max_lora_rank"] == 8 and args["enforce_eager"] is True


def test_unknown_platform_and_bad_sizes_are_refused():
    with pytest.raises(ValueError, match=r"platform 'rocm' is not supported.*cpu, cuda"):
        engine_args("rocm", **COMMON)
    with pytest.raises(ValueError, match="platform 'tpu'"):
        engine_env("tpu")
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1, got 0"):
        engine_args("cpu", **COMMON, tensor_parallel_size=0)


def test_rollout_config_gpu_fields():
    rc = load_config(None, ["rollout.num_gpus=1", "rollout.tensor_parallel_size=2"]).rollout
    assert rc.gpus_per_worker == 2.0 and rc.gpu_memory_utilization == 0.9
    assert load_config(None, ["rollout.tensor_parallel_size=2"]).rollout.gpus_per_worker == 0.0  # CPU
    with pytest.raises(ConfigError, match=r"tensor_parallel_size = 2 runs one engine rank per GPU.*num_gpus = 0.5"):
        load_config(None, ["rollout.num_gpus=0.5", "rollout.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match=r"gpu_memory_utilization = 0.9 .*num_gpus = 0.5 share.*<= 0.5"):
        load_config(None, ["rollout.num_gpus=0.5"])
    assert load_config(None, ["rollout.num_gpus=0.5", "rollout.gpu_memory_utilization=0.4"]).rollout.num_gpus == 0.5
    with pytest.raises(ConfigError, match="rollout.gpu_memory_utilization"):
        load_config(None, ["rollout.gpu_memory_utilization=1.5"])


def test_a_rollout_worker_reserves_a_bundle_of_all_its_ranks_gpus():
    from orchestrator.placement import rollout_bundle, run_bundles

    cfg = load_config(None, ["rollout.num_gpus=1", "rollout.tensor_parallel_size=4", "rollout.num_cpus=2",
                             "rollout.num_workers=2", "learner.num_gpus=1"])
    assert rollout_bundle(cfg) == {"CPU": 2.0, "GPU": 4.0}
    assert run_bundles(cfg) == [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 4.0}, {"CPU": 2.0, "GPU": 4.0}]


def test_cast_load_only_for_unquantised_float_checkpoints_of_another_dtype(tmp_path):
    import json

    import torch
    from safetensors.torch import save_file

    from rollout.engine_args import needs_cast_load

    save_file({"w": torch.zeros(2, dtype=torch.float32), "ids": torch.zeros(2, dtype=torch.int64)},
              str(tmp_path / "model.safetensors"))
    assert needs_cast_load(str(tmp_path), "bfloat16") and needs_cast_load(str(tmp_path), "float16")
    assert not needs_cast_load(str(tmp_path), "float32")
    assert not needs_cast_load(str(tmp_path), "auto")  # vLLM picks the dtype: nothing to cast to
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "fp8"}}))
    assert not needs_cast_load(str(tmp_path), "bfloat16")  # quantised weights are vLLM's to load


def test_cpu_blocks_are_small_enough_for_a_shared_prompt_prefix():
    from rollout.engine_args import CPU_BLOCK_SIZE

    assert CPU_BLOCK_SIZE == 32 and engine_args("cpu", **COMMON)["block_size"] == 32  # vLLM's CPU default: 128
    assert engine_args("cpu", **COMMON, block_size=64)["block_size"] == 64
    assert "block_size" not in engine_args("cuda", **COMMON)  # vLLM's own default on GPU
    assert engine_args("cuda", **COMMON, block_size=16)["block_size"] == 16
    with pytest.raises(ValueError, match="block_size must be >= 1 token, got 0"):
        engine_args("cpu", **COMMON, block_size=0)


# SmolLM2-135M-Instruct's config.json (the fields the KV size reads)
SMOLLM2 = {"num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3}


def test_kv_bytes_per_token_by_hand():
    from rollout.engine_args import kv_bytes_per_token

    # K and V x 30 layers x 3 KV heads x head_dim 576 / 9 = 64 x 2 bytes (bf16)
    assert kv_bytes_per_token(SMOLLM2, "bfloat16") == 2 * 30 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(SMOLLM2, "float32") == 46080
    no_gqa = {k: v for k, v in SMOLLM2.items() if k != "num_key_value_heads"}
    assert kv_bytes_per_token(no_gqa, "float16") == 2 * 30 * 9 * 64 * 2  # every head keeps its K and V
    assert kv_bytes_per_token({**SMOLLM2, "head_dim": 128}, "bfloat16") == 2 * 30 * 3 * 128 * 2
    with pytest.raises(ValueError, match=r"lacks \['num_hidden_layers'\].*rollout.kv_cache_memory_bytes"):
        kv_bytes_per_token({"hidden_size": 8, "num_attention_heads": 2}, "bfloat16")
    with pytest.raises(ValueError, match="dtype 'int8' has no known size"):
        kv_bytes_per_token(SMOLLM2, "int8")


def test_batch_kv_cache_holds_whole_blocks_within_bounds():
    from rollout.engine_args import KV_AUTO_MIN_BYTES, batch_kv_cache_bytes

    ram = 24 << 30
    # the main job's eval: 200 sequences of 256 tokens (8 blocks of 32) x 23040 bytes
    assert batch_kv_cache_bytes(23040, 200, 256, 32, ram) == 200 * 256 * 23040
    assert batch_kv_cache_bytes(23040, 200, 250, 32, ram) == 200 * 256 * 23040  # rounded up to whole blocks
    assert batch_kv_cache_bytes(23040, 200, 257, 32, ram) == 200 * 288 * 23040
    assert batch_kv_cache_bytes(1024, 2, 64, 32, ram) == KV_AUTO_MIN_BYTES  # a tiny model's cache: the floor
    assert batch_kv_cache_bytes(23040, 256, 4096, 32, ram) == ram // 16  # capped at 1/16 of the node's memory
    with pytest.raises(ValueError, match="seqs must be >= 1, got 0"):
        batch_kv_cache_bytes(23040, 0, 256, 32, ram)


def test_batch_seqs_is_the_largest_engine_call():
    from rollout.engine_args import batch_seqs

    assert batch_seqs(200, 1, 4, 8) == 200  # the held-out eval, one greedy sample per problem
    assert batch_seqs(201, 2, 4, 8) == 101  # each worker evaluates its share
    assert batch_seqs(0, 1, 4, 8) == 32  # no eval: a request's prompts x samples
    assert batch_seqs(0, 1, 1, 1) == 1


def test_rollout_config_kv_fields():
    rc = load_config(None).rollout
    assert rc.kv_cache_memory_bytes is None and rc.block_size is None  # sized for the batch; 32 on CPU
    assert load_config(None, ["rollout.kv_cache_memory_bytes=67108864"]).rollout.kv_cache_memory_bytes == 64 << 20
    with pytest.raises(ConfigError, match="rollout.block_size"):
        load_config(None, ["rollout.block_size=0"])
