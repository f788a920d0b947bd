"""The DeepSpeed config of a learner rank, built from `LearnerConfig` (a pure function: unit-tested).

Memory options for models that do not fit one device in full (all from config):

- ``learner.zero_stage = 3`` partitions parameters, gradients and optimizer state over the ranks; the
  worker then loads the model under ``deepspeed.zero.Init`` (transformers' ``HfDeepSpeedConfig``), so no
  rank ever holds the full fp32 model.
- ``learner.offload_optimizer`` / ``learner.offload_params`` move optimizer state (ZeRO >= 1) and
  parameters (ZeRO-3) to CPU memory between uses (DeepSpeed ZeRO-Offload / ZeRO-Infinity; ``cpu``, pinned).
  They apply to GPU learners only: on a CPU learner everything is in CPU memory already.
- ``learner.gradient_checkpointing`` recomputes each decoder layer's activations in backward instead of
  keeping them (transformers' non-reentrant checkpointing), trading ~1/3 more compute for activation
  memory that no longer grows with the number of layers.

Left out on purpose: NVMe offload, ZeRO++ quantized communication.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from learner.config import LearnerConfig


def deepspeed_config(c: LearnerConfig, gas: int, samples_per_step: int) -> dict[str, Any]:
    """The ``deepspeed.initialize`` config dict of one rank.

    Args:
        c: the learner config.
        gas: gradient accumulation steps per optimizer step (the scale DeepSpeed divides the loss by,
            which the worker undoes; passes per step may differ from it).
        samples_per_step: samples per learner step (all ranks, all PPO minibatches).
    """
    zero: dict[str, Any] = {"stage": c.zero_stage}
    if c.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = c.zero3_param_persistence_threshold
    if c.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if c.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    out: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": c.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": samples_per_step // c.ppo_minibatches,
        "gradient_clipping": c.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": c.dtype == "bf16"},
        # DeepSpeed's CPU Adam (a JIT-built op) is what ZeRO-Offload steps with; torch's fused AdamW otherwise:
        # one kernel over each flat partition, where torch would pick its per-tensor loop for CPU tensors
        "optimizer": {"type": "AdamW", "params": {
            "lr": c.lr, "weight_decay": c.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
            **({} if c.offload_optimizer else {"torch_adam": True, "fused": True})}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if c.warmup_steps:
        out["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_min_lr": 0.0, "warmup_max_lr": c.lr, "warmup_num_steps": c.warmup_steps,
            "warmup_type": "linear"}}
    return out
