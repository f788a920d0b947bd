"""Model-based rewards: pools of reward-model actors (``[[reward_models]]``) that reward functions and
environments call, a sequence-classification reward model or a generative judge on a vLLM engine.

- `config`: the ``[[reward_models]]`` config models and the run-level rules (`check_reward_models`).
- `text`: templates filled with a sample, TRL prompts as text, the judge's `VerdictParser`.
- `scoring`: the model inside a server (`ClassifierScorer`, `JudgeScorer`).
- `server`: `RewardModelServer`, one worker of a pool (a Ray async actor that batches concurrent calls).
- `client`: `RewardModelClient` and `reward_model(name)`, how any process of a run calls a pool.
- `pool`: `RewardModelPool`, the driver's handle on a pool's servers (start, grow, shrink, metrics).

User code: ``from rollout.reward_models import reward_model`` then
``reward_model("<name>").score(prompts, completions, **columns) -> list[float | None]``.
Each module's docstring says what it deliberately leaves out.
"""

from __future__ import annotations

from rollout.reward_models.client import RewardModelClient, reward_model, reward_model_reward, reward_models_env
from rollout.reward_models.config import (DEFAULT_JUDGE_TEMPLATE, ENV_VAR, REWARD_MODEL_PREFIX, REWARD_MODEL_TYPES,
                                          ClassifierRewardModelConfig, JudgeRewardModelConfig, RewardModelConfig,
                                          check_reward_models)
from rollout.reward_models.pool import RewardModelPool
from rollout.reward_models.scoring import SCORERS, ClassifierScorer, JudgeScorer, label_index
from rollout.reward_models.server import RewardModelServer
from rollout.reward_models.text import VerdictParser, render_template, template_fields

__all__ = [
    "DEFAULT_JUDGE_TEMPLATE", "ENV_VAR", "REWARD_MODEL_PREFIX", "REWARD_MODEL_TYPES", "SCORERS",
    "ClassifierRewardModelConfig", "ClassifierScorer", "JudgeRewardModelConfig", "JudgeScorer", "RewardModelClient",
    "RewardModelConfig", "RewardModelPool", "RewardModelServer", "VerdictParser", "check_reward_models",
    "label_index", "render_template", "reward_model", "reward_model_reward", "reward_models_env",
    "template_fields",
]
