"""`rollout.episode.run_episodes` with a scripted sampler (no engine): how an episode ends (completed, truncated
at its token budget, failed by the reward function) and the bound on environment calls left hanging; the
`CallPool` that bounds each environment call from its own start."""

from __future__ import annotations

import threading
import time

import pytest

from buffer import Problem
from rollout.engine import Completion
from rollout.envs import EnvConfig, Environment, StepResult
from rollout.episode import CallPool, Episode, HungWorkerError, TurnEncoder, hung_steps, run_episodes

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
        with pytest.raises(HungWorkerError, match="environment 'single_turn': 3 reset/step calls .* rollout.env.max_hung_steps = 2"):
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


def test_queued_calls_get_their_whole_budget_from_their_own_start():
    """41 calls on 32 threads: 40 quick ones (0.3 s each) and one that hangs. Nine quick ones wait for a thread
    and finish 0.6 s after the batch was queued, past a 0.5 s budget counted from the batch; from each call's own
    start they are in time. The hung one is abandoned 0.5 s after it started, not when the batch ends."""
    pool, release = CallPool(32, 0.5), threading.Event()
    try:
        t0 = time.monotonic()
        hung = pool.submit(release.wait, 30)
        calls = [pool.submit(lambda i=i: time.sleep(0.3) or i) for i in range(40)]
        out = pool.wait([hung, *calls])
        elapsed = time.monotonic() - t0
        assert out[0] == ("timed_out", None)
        assert out[1:] == [("ok", i) for i in range(40)]
        assert sum(c.started - t0 > 0.25 for c in calls) == 9  # they did start late (a second wave)
        assert 0.55 <= elapsed < 2.0, elapsed
        assert not pool.stuck()  # one abandoned call of 32 threads
    finally:
        release.set()
        pool.shutdown()


def test_calls_behind_only_hung_threads_fail_as_never_started_at_once():
    """Every thread holds an abandoned call: the queued calls can never start and are reported so, right after
    the running ones time out, not after waiting for ever. An error of a call is returned, not raised."""
    pool, release = CallPool(2, 0.3), threading.Event()
    try:
        t0 = time.monotonic()
        calls = [pool.submit(release.wait, 30) for _ in range(2)] + [pool.submit(int, "7"), pool.submit(int, "x")]
        out = pool.wait(calls)
        assert [k for k, _ in out] == ["timed_out", "timed_out", "not_started", "not_started"]
        assert time.monotonic() - t0 < 1.5 and pool.stuck()
        release.set()  # the abandoned calls return: the threads serve again
        for f in pool.abandoned:
            f.result(timeout=5)
        more = pool.wait([pool.submit(int, "7"), pool.submit(int, "x")])
        assert more[0] == ("ok", 7) and more[1][0] == "raised" and isinstance(more[1][1], ValueError)
    finally:
        release.set()
        pool.shutdown()


class SlowStep(OneAnswer):
    """Each step takes ``seconds``."""

    seconds = 0.0

    def step(self, action: str) -> StepResult:
        time.sleep(self.seconds)
        return super().step(action)


def test_episodes_queued_behind_busy_env_threads_do_not_time_out(enc, monkeypatch):
    """More episodes than environment threads: each step is bounded from its own start, so the episodes whose
    step waited for a thread still complete (one deadline for the whole turn failed them)."""
    import rollout.episode as episode

    monkeypatch.setattr(episode, "ENV_THREADS", 4)
    monkeypatch.setattr(SlowStep, "seconds", 0.3)
    eps = [Episode(SlowStep()) for _ in range(12)]  # three waves of 0.3 s under a 0.5 s step budget
    run_episodes([eps], [0], _sampler(["stop"] * 12), enc, EnvConfig(step_timeout_s=0.5), 3, 512)
    assert [e.status for e in eps] == ["completed"] * 12, [e.error for e in eps]
