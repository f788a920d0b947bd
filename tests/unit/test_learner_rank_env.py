"""The environment of the learner ranks' processes (`learner.group.rank_env`)."""

from __future__ import annotations

from learner.config import LearnerConfig
from learner.group import rank_env


def test_cpu_ranks_pin_threads_and_skip_torchdynamo():
    env = rank_env(LearnerConfig(num_cpus=2))
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "2",
                   "TORCHDYNAMO_DISABLE": "1"}
    assert rank_env(LearnerConfig(num_cpus=2, torch_threads=3))["OMP_NUM_THREADS"] == "3"


def test_gpu_ranks_keep_torchdynamo():
    env = rank_env(LearnerConfig(num_gpus=1))
    assert env["DS_ACCELERATOR"] == "cuda" and "TORCHDYNAMO_DISABLE" not in env
