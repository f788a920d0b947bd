"""The stand-in rollout workers of `relayrl bench` start without vLLM: `FakeRolloutWorker` (``scaling``) is a
real `RolloutWorker` around a fake engine, `IdleRolloutWorker` (learner-only rigs) answers the start-up probe."""

from __future__ import annotations

from buffer import ReplayBuffer
from rollout.config import DataConfig, RolloutConfig
from tooling.bench_actors import FakeRolloutWorker, IdleRolloutWorker


def test_fake_rollout_worker_starts_on_its_fake_engine(tiny_model):
    worker = FakeRolloutWorker(RolloutConfig(), DataConfig(), tiny_model, 0, ReplayBuffer())
    assert worker.get_version() == 0
    assert type(worker.engine).__name__ == "_FakeEngine"  # no vLLM engine was built


def test_idle_rollout_worker_answers_the_start_up_probe():
    worker = IdleRolloutWorker(RolloutConfig(), DataConfig(), "unused", 0, "unused-buffer")
    assert worker.get_version() == 0


def test_idle_worker_passes_the_groups_reward_check():
    """`RolloutGroup` checks the reward config against its worker class's ``reward_fn`` before starting any actor
    (a learner-only rig failed on it with an AttributeError)."""
    from rollout.config import DataConfig, RolloutConfig
    from rollout.rewards import RewardSet, reward_columns
    from rollout.worker import RolloutWorker

    assert IdleRolloutWorker.reward_fn is RolloutWorker.reward_fn
    cfg = RolloutConfig()
    RewardSet(cfg.rewards, cfg.reward_timeout_s, reward_columns(DataConfig()), check=IdleRolloutWorker.reward_fn)
