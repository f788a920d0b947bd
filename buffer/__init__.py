"""Data manager: the `Sample` schema, the staleness-bounded replay buffer, curation, prompt samplers."""

from buffer.curation import PassRateTracker, PromptValueTracker, ZeroVarianceFilter, allocate_rollouts
from buffer.prompt_sampler import PROMPT_SAMPLERS, DifficultySampler, UniformSampler
from buffer.replay import ReplayBuffer
from buffer.sample import Sample, SampleStatus

__all__ = ["PROMPT_SAMPLERS", "DifficultySampler", "PassRateTracker", "PromptValueTracker", "ReplayBuffer",
           "Sample", "SampleStatus", "UniformSampler", "ZeroVarianceFilter", "allocate_rollouts"]
