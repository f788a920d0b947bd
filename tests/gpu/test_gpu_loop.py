"""The same loop on CUDA (vllm CUDA build, NCCL learner group). Skipped without a GPU."""

from __future__ import annotations

import math

import pytest

from orchestrator.config import load_config
from orchestrator.loop import Trainer
from rollout.tasks import load_problems

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


@pytest.mark.timeout(900)
def test_loop_on_one_gpu(tiny_model, ray_local, tmp_path):
    cfg = load_config(None, [
        f"model.path={tiny_model}", f"output_dir={tmp_path}", "num_steps=2", "prompts_per_step=4",
        "data.train_size=32", "data.eval_size=8", "rollout.group_size=4", "rollout.max_tokens=12",
        "rollout.num_gpus=0.5", "rollout.gpu_memory_utilization=0.3", "rollout.max_model_len=256",
        "learner.num_gpus=0.5", "learner.micro_batch_size=4", "learner.weight_decay=1.0", "learner.lr=0.05",
    ])
    trainer = Trainer(cfg, tmp_path / "run", tiny_model, load_problems(cfg.data, "train"),
                      load_problems(cfg.data, "eval"))
    try:
        summary = trainer.run(progress=False)
        versions = ray_local.get([w.get_version.remote() for w in trainer.rollout.workers], timeout=60)
    finally:
        trainer.shutdown()
    assert summary["policy/version"] == 2 and versions == [2]  # the workers serve the last pushed policy
    assert summary["data/trained_groups"] == 2 * 4 and summary["data/groups_dropped_stale"] == 0
    assert math.isfinite(summary["learner/loss"]) and summary["learner/grad_norm"] > 0  # a real update on the GPU
    assert summary["weights/bytes"] > 0 and "eval/accuracy" in summary
