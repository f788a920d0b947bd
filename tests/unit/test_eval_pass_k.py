"""Held-out pass@k: the unbiased estimator (Chen et al. 2021) against hand-computed values, and a real
`RolloutWorker` (episodes, environment, rewards) that plays the greedy eval and the pass@k samples in one engine
call, around a stand-in engine that records each call's requests (a greedy answer is right, sampled answers
alternate wrong / right), so which completion went to which episode shows in the results."""

from __future__ import annotations

import math

import pytest

from buffer import Problem, ReplayBuffer
from orchestrator.metrics import pass_at_k, pass_k_metrics
from rollout.config import DataConfig, RolloutConfig


def test_pass_at_k_matches_the_hand_computed_combinatorics():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the per-sample accuracy
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 1, 8) == 1.0  # n == k: any sample right
    assert pass_at_k(4, 2, 3) == 1.0  # 3 of 4 drawn always hold one of the 2 right ones


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 2), (4, 1, 0), (4, 1, 5), (4, -1, 2)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match=f"n = {n}, c = {c}, k = {k}"):
        pass_at_k(n, c, k)


def test_pass_k_metrics_mean_se_and_sampled_accuracy():
    m = pass_k_metrics([0, 1, 8], 8, 8)
    assert m["eval/pass@k"] == pytest.approx(2 / 3)
    # per-problem values 0, 1, 1: sample std sqrt(1/3), over sqrt(3) problems
    assert m["eval/pass@k_se"] == pytest.approx(math.sqrt(1 / 3) / math.sqrt(3))
    assert m["eval/sampled_accuracy"] == pytest.approx(9 / 24)
    assert m["eval/pass_k_k"] == 8.0 and m["eval/pass_k_problems"] == 3.0
    assert pass_k_metrics([], 8, 8) == {}
    assert pass_k_metrics([2], 4, 4)["eval/pass@k_se"] == 0.0


class _MixedEngine:
    """Stand-in for `rollout.engine.VLLMEngine`: a greedy request answers "Answer: 2"; a sampled one answers
    "Answer: 9", "Answer: 2", "Answer: 9", ... Records ``(counts, temperatures)`` of every call."""

    calls: list = []

    def __init__(self, model_path: str, *args, **kwargs) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)

    def warm_up(self) -> float:
        return 0.0

    def generate(self, prompt_token_ids, n, max_tokens, temperature=1.0, *args, **kwargs):
        from rollout.engine import Completion

        counts = n if isinstance(n, list) else [n] * len(prompt_token_ids)
        temps = temperature if isinstance(temperature, list) else [temperature] * len(prompt_token_ids)
        type(self).calls.append((counts, temps))

        def answer(text):
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return Completion(ids, [-1.0] * len(ids), text, "stop")
        return [[answer("Answer: 2" if t == 0.0 or j % 2 else "Answer: 9") for j in range(k)]
                for k, t in zip(counts, temps)]


def test_worker_plays_greedy_and_sampled_episodes_in_one_engine_call(tiny_model, monkeypatch):
    import torch

    import rollout.engine
    from rollout.worker import RolloutWorker

    monkeypatch.setattr(rollout.engine, "VLLMEngine", _MixedEngine)
    before = torch.get_num_threads()
    try:
        worker = RolloutWorker(RolloutConfig(temperature=0.7), DataConfig(), tiny_model, 0, ReplayBuffer())
        _MixedEngine.calls = []
        problems = [Problem("eval/0", "1 + 1", "2"), Problem("eval/1", "4 + 5", "9"), Problem("eval/2", "2 + 0", "2")]
        correct, counts = worker.evaluate_pass_k(problems, [True, True, False], 3, 0, 8)
        # greedy "Answer: 2": right on problems 0 and 2; of the 3 samples ("9", "2", "9") one is right on problem 0
        # and two on problem 1; had a sampled completion gone to a greedy episode, problem 0's greedy one would fail
        assert correct == [True, False, True] and counts == [1, 2]
        assert _MixedEngine.calls == [([1, 3, 1, 3, 1], [0.0, 0.7, 0.0, 0.7, 0.0])]  # one call, own temperatures
        with pytest.raises(ValueError, match="2 sampled flags for 3 problems"):
            worker.evaluate_pass_k(problems, [True, True], 3, 0, 8)
    finally:
        torch.set_num_threads(before)
