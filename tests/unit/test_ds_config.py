"""`learner.ds_config.deepspeed_config` and the learner's memory options in config."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from learner.config import LearnerConfig
from learner.ds_config import deepspeed_config


def test_default_config_keeps_everything_on_the_device_with_torch_fused_adamw():
    ds = deepspeed_config(LearnerConfig(), gas=2, samples_per_step=32)
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["fused"] is True
    assert ds["train_batch_size"] == 32 and ds["gradient_accumulation_steps"] == 2 and "scheduler" not in ds


def test_zero3_offload_moves_optimizer_state_and_parameters_to_cpu_memory():
    c = LearnerConfig(zero_stage=3, num_gpus=1, offload_optimizer=True, offload_params=True, warmup_steps=5,
                      ppo_minibatches=2)
    ds = deepspeed_config(c, gas=1, samples_per_step=32)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == c.zero3_param_persistence_threshold
    assert z["offload_optimizer"] == z["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert not {"torch_adam", "fused"} & set(ds["optimizer"]["params"])  # ZeRO-Offload: DeepSpeed's CPU Adam
    assert ds["train_batch_size"] == 16 and ds["scheduler"]["params"]["warmup_num_steps"] == 5


def test_offload_on_a_cpu_learner_or_below_zero3_is_refused_by_name():
    with pytest.raises(ValidationError, match="learner.offload_optimizer = true .* learner.num_gpus = 0"):
        LearnerConfig(offload_optimizer=True)
    with pytest.raises(ValidationError, match="learner.offload_params needs learner.zero_stage = 3.*got 2"):
        LearnerConfig(offload_params=True, num_gpus=1)
    assert LearnerConfig(offload_optimizer=True, num_gpus=1, zero_stage=1).offload_optimizer
