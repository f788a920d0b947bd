"""A held-out eval generates with ``rollout.eval_num_threads`` threads (the learner waits for it, so its core is
free), and the rollout requests around it keep ``rollout.num_cpus``. A real `RolloutWorker` (episodes, environment,
rewards) around a stand-in engine that records the torch thread count each generate call ran with."""

from __future__ import annotations

import pytest

from buffer import Problem, ReplayBuffer
from rollout.config import DataConfig, RolloutConfig


class _ThreadsEngine:
    """Stand-in for `rollout.engine.VLLMEngine`: answers "Answer: 2", records ``torch.get_num_threads()``."""

    seen: list[int] = []

    def __init__(self, model_path: str, *args, **kwargs) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    def warm_up(self) -> float:
        return 0.0

    def generate(self, prompt_token_ids, n, max_tokens, *args, **kwargs):
        import torch

        from rollout.engine import Completion

        type(self).seen.append(torch.get_num_threads())
        counts = n if isinstance(n, list) else [n] * len(prompt_token_ids)
        ids = self.tokenizer("Answer: 2", add_special_tokens=False)["input_ids"]
        return [[Completion(ids, [-1.0] * len(ids), "Answer: 2", "stop") for _ in range(k)] for k in counts]


@pytest.mark.parametrize(("eval_threads", "expected"), [(2, 2), (0, 1)])
def test_eval_uses_its_own_thread_count_and_restores_it(tiny_model, monkeypatch, eval_threads, expected):
    import torch

    import rollout.engine
    from rollout.worker import RolloutWorker

    monkeypatch.setattr(rollout.engine, "VLLMEngine", _ThreadsEngine)
    before = torch.get_num_threads()
    try:
        worker = RolloutWorker(RolloutConfig(num_cpus=1.0, eval_num_threads=eval_threads), DataConfig(), tiny_model,
                               0, ReplayBuffer())
        _ThreadsEngine.seen = []
        problems = [Problem(f"eval/{i}", f"{i} + {i}", "2") for i in range(3)]
        assert worker.evaluate(problems, 0, 8) == [True] * 3
        assert _ThreadsEngine.seen == [expected]  # the three problems in one engine call, with the eval's threads
        assert torch.get_num_threads() == 1  # back to rollout.num_cpus for the next rollout request
    finally:
        torch.set_num_threads(before)
