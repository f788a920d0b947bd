"""Generation: vLLM engines in Ray actors that turn prompts into scored sample groups.

`RolloutGroup` holds N `RolloutWorker` actors (elastic: add, drain, recover) with least-loaded
routing; each worker wraps a `VLLMEngine`, scores responses with the run's reward functions
(`rollout.rewards`: built-in, or the user's own by import path with TRL's signature), writes `buffer.Sample`
groups straight into the replay buffer and returns a `buffer.RolloutResult`. Prompts come from
`rollout.tasks` (reasoning-gym tasks, or datasets in TRL's formats read with `datasets`: save_to_disk dirs,
jsonl/json/parquet/csv files, hub names); `rollout.config` holds `DataConfig`,
`RolloutConfig` and `RewardConfig`. `RewardModelPool` serves a reward model or an LLM judge to reward functions
(`rollout.reward_models`, ``[[reward_models]]``). Depends on buffer/ (and base/) only.

Importing this package is light: vLLM, torch and Ray load inside the functions that need them.
"""

from rollout.config import DataConfig, RewardConfig, RolloutConfig
from rollout.episode import HungWorkerError
from rollout.group import RolloutGroup
from rollout.reward_models import RewardModelPool, reward_model, reward_models_env
from rollout.rewards import REWARDS, RewardSet, register_reward, score_response, score_safely
from rollout.tasks import encode_prompt, load_problems
from rollout.worker import RolloutWorker

__all__ = ["REWARDS", "DataConfig", "HungWorkerError", "RewardConfig", "RewardModelPool", "RewardSet", "RolloutConfig",
           "RolloutGroup", "RolloutWorker", "encode_prompt", "load_problems", "register_reward", "reward_model",
           "reward_models_env", "score_response", "score_safely"]
