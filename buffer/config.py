"""Config of the data manager (`BufferConfig`); composed by `orchestrator.config.RunConfig`.

Left out on purpose: ``max_staleness`` is read by `buffer.staleness.StalenessManager` only.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from base.config import StrictConfig


class SelfImitationConfig(StrictConfig):
    """Self-imitation replay (`buffer.self_imitation`): past successful samples rejoin later batches."""

    fraction: float = Field(0.0, ge=0.0, le=1.0, description="replayed samples per fresh sample of a batch "
                            "(0: off); each is trained with learner.self_imitation's term only")
    capacity: int = Field(512, ge=1, le=1_000_000, description="successful samples held at most (oldest evicted)")
    min_reward: float = Field(1.0, description="lowest reward a trained sample needs to enter the store")


class BufferConfig(StrictConfig):
    max_staleness: int = Field(
        1, ge=0, le=1000, description="max policy lag (versions) of trained samples; 0 = on-policy"
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO dynamic sampling: drop zero-reward-variance groups, generate more to refill")
    max_refill_factor: float = Field(
        8.0, ge=1.0, description="stop the run when one step needed more than this many times "
        "prompts_per_step generated groups (dynamic sampling finds no signal)")
    prompt_sampler: Literal["uniform", "difficulty"] = Field(
        "uniform", description="prompt selection: shuffled epochs, or pass-rate-aware (buffer.prompt_sampler)")
    sampler_floor: float = Field(0.05, ge=0.0, le=1.0, description="difficulty sampler: uniform mixture weight")
    prioritized_replay: bool = Field(
        False, description="train the highest reward-variance+diversity fresh groups first, not FIFO")
    value_tracker: bool = Field(False, description="SPO per-prompt value tracker fills sample baselines")
    value_tracker_discount: float = Field(0.9, gt=0.0, le=1.0, description="SPO tracker discount per reward")
    rollout_allocation: Literal["uniform", "knapsack"] = Field(
        "uniform", description="samples per prompt: rollout.group_size each, or Knapsack RL budgets "
        "(prompts_per_step*group_size samples per step split by estimated pass rate)")
    allocation_min_n: int = Field(2, ge=1, le=1024, description="knapsack: fewest samples per prompt")
    allocation_max_n: int = Field(32, ge=1, le=1024, description="knapsack: most samples per prompt")
    self_imitation: SelfImitationConfig = Field(
        default_factory=SelfImitationConfig, description="self-imitation replay (Oh et al. 2018; SPEAR): samples "
        "with reward >= min_reward from earlier steps rejoin batches where their reward still beats their "
        "prompt's newest group mean (buffer.self_imitation)")
