"""Generation: vLLM engines in Ray actors that turn prompts into scored sample groups.

`RolloutGroup` holds N `RolloutWorker` actors (elastic: add, drain, recover) with least-loaded
routing; each worker wraps a `VLLMEngine`, scores responses with a reward function
(`rollout.rewards`), writes `buffer.Sample` groups straight into the replay buffer and returns a
`buffer.RolloutResult`. Prompts come from `rollout.tasks` (reasoning-gym tasks or jsonl/parquet
files); `rollout.config` holds `DataConfig` and `RolloutConfig`. Depends on buffer/ only.

Importing this package is light: vLLM, torch and Ray load inside the functions that need them.
"""

from rollout.config import DataConfig, RolloutConfig
from rollout.group import RolloutGroup
from rollout.rewards import score_response, score_safely
from rollout.tasks import encode_prompt, load_problems
from rollout.worker import RolloutWorker

__all__ = ["DataConfig", "RolloutConfig", "RolloutGroup", "RolloutWorker", "encode_prompt", "load_problems",
           "score_response", "score_safely"]
