"""The data manager, and everything that crosses actors.

Records: `Sample` (one response with its token-level facts), `Problem`, `GenerateRequest`,
`RolloutResult`, `BatchStats` (`buffer.records`), the weight-bucket format (`base.weight_buckets`)
and the collective weight group (`base.weight_group`). Data management: the staleness-bounded
`ReplayBuffer`, admission control (`StalenessManager`), curation (zero-variance filter, SPO value
tracker, pass-rate tracker, Knapsack allocation), prompt samplers. rollout/ and learner/ depend on
this package and never on each other; it depends on neither.
"""

from buffer.config import BufferConfig
from buffer.curation import PassRateTracker, PromptValueTracker, ZeroVarianceFilter, allocate_rollouts
from buffer.prompt_sampler import PROMPT_SAMPLERS, DifficultySampler, UniformSampler
from buffer.records import BatchStats, GenerateRequest, Problem, RolloutResult
from buffer.replay import ReplayBuffer
from buffer.sample import Sample, SampleStatus, scored_rewards
from buffer.staleness import StalenessManager

__all__ = ["PROMPT_SAMPLERS", "BatchStats", "BufferConfig", "DifficultySampler", "GenerateRequest",
           "PassRateTracker", "Problem", "PromptValueTracker", "ReplayBuffer", "RolloutResult", "Sample",
           "SampleStatus", "StalenessManager", "UniformSampler", "ZeroVarianceFilter", "allocate_rollouts",
           "scored_rewards"]
