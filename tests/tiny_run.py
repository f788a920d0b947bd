"""The run config shared by integration tests on the tiny sums model: 1-digit sums, short answers,
fp32 on both sides (so rollout and learner logprobs agree to ~1e-4), a small KV cache."""

from __future__ import annotations

import time

from learner.worker import LearnerWorker
from orchestrator.config import RunConfig, load_config


def tiny_run_config(model: str, output_dir, *extra: str) -> RunConfig:
    """Tiny-model run config; ``extra`` dotted overrides win over the defaults here."""
    return load_config(None, [
        f"model.path={model}", f"output_dir={output_dir}", "num_steps=3", "prompts_per_step=4",
        "data.train_size=100", "data.eval_size=0", "data.one_shot=false",
        'data.task_config={min_terms = 2, max_terms = 2, max_digits = 1, operators = ["+"], '
        "allow_parentheses = false, allow_negation = false}",
        "rollout.group_size=4", "rollout.max_tokens=16", "rollout.dtype=float32",
        "rollout.kv_cache_memory_bytes=67108864", "rollout.max_model_len=256", "rollout.prompts_per_request=2",
        "learner.micro_batch_size=8", "learner.dtype=fp32", "learner.lr=1e-3", *extra,
    ])


class PacedLearner(LearnerWorker):
    """A real learner whose steps last at least ``min_step_s`` (3 s): long enough for an operator (a
    scale request, a crash) to act between pushes. Ray pickles this module by value (see conftest)."""

    min_step_s = 3.0

    def train_step(self, batch, version):
        t0 = time.monotonic()
        out = super().train_step(batch, version)
        time.sleep(max(0.0, self.min_step_s - (time.monotonic() - t0)))
        return out
