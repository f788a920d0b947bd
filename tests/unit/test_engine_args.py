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
