"""`rollout.episode.run_episodes` with a scripted sampler (no engine): how an episode ends (completed, truncated
at its token budget, failed by the reward function) and the bound on environment calls left hanging."""

from __future__ import annotations

import threading

import pytest

from buffer import Problem
from rollout.engine import Completion
from rollout.envs import EnvConfig, Environment, StepResult
from rollout.episode import Episode, TurnEncoder, hung_steps, run_episodes

PROBLEM = Problem("train/0", "Calculate 2 + 3.", "5")


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    from tiny_model import build_tiny_model
    from transformers import AutoTokenizer

    return TurnEncoder(AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tok"))))


class OneAnswer(Environment):
    """Ends after the first answer; ``info`` as given."""

    def __init__(self, info: dict | None = None, release: threading.Event | None = None) -> None:
        super().__init__(PROBLEM, {}, EnvConfig())
        self.info, self.release = info or {}, release

    def reset(self, seed: int):
        return [{"role": "user", "content": PROBLEM.question}]

    def step(self, action: str) -> StepResult:
        if self.release is not None:
            self.release.wait(60)  # hangs until the test releases it
        return StepResult([], 1.0, True, dict(self.info))


def _sampler(finish: list[str]):
    """Each episode's turn: 3 tokens with finish reason ``finish[i]`` (episodes in order)."""
    at = [0]

    def sample(prompts, n, budget):
        outs = []
        for k in n:
            outs.append([Completion([5, 6, 7], [-0.1] * 3, "Answer: 5", finish[at[0] + j]) for j in range(k)])
            at[0] += k
        return outs, [[[0] * 3 for _ in g] for g in outs]
    return sample


def test_an_episode_ends_completed_truncated_at_its_budget_or_failed_by_its_reward(enc):
    eps = [Episode(OneAnswer()), Episode(OneAnswer()),
           Episode(OneAnswer({"correct": False, "reward_error": "raised ValueError: unparsable"}))]
    run_episodes([eps], [0], _sampler(["stop", "length", "stop"]), enc, EnvConfig(), 3, 512)
    assert [e.status for e in eps] == ["completed", "truncated", "failed"]
    assert eps[2].reward_error == "raised ValueError: unparsable" and "reward function failed" in eps[2].error
    assert eps[2].to_sample("p", "g", "5").loss_mask == [0, 0, 0] and eps[0].to_sample("p", "g", "5").loss_mask == [1] * 3


def test_hung_environment_calls_are_bounded_per_process(enc):
    cfg = EnvConfig(step_timeout_s=0.2, max_hung_steps=2)
    release = threading.Event()
    try:
        for _ in range(3):  # each round abandons one hanging step
            eps = [Episode(OneAnswer(release=release))]
            run_episodes([eps], [0], _sampler(["stop"]), enc, cfg, 3, 512)
            assert eps[0].status == "failed" and "step_timeout_s" in eps[0].error
        assert hung_steps() == 3
        with pytest.raises(RuntimeError, match="environment 'single_turn': 3 reset/step calls .* rollout.env.max_hung_steps = 2"):
            run_episodes([[Episode(OneAnswer())]], [0], _sampler(["stop"]), enc, cfg, 3, 512)
    finally:
        release.set()
    for _ in range(50):  # the abandoned threads return once released; the worker serves again
        if hung_steps() == 0:
            break
        threading.Event().wait(0.1)
    eps = [Episode(OneAnswer())]
    run_episodes([eps], [0], _sampler(["stop"]), enc, cfg, 3, 512)
    assert eps[0].status == "completed"
