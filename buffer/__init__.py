"""Data manager: the `Sample` schema and the staleness-bounded replay buffer."""

from buffer.replay import ReplayBuffer
from buffer.sample import Sample, SampleStatus

__all__ = ["ReplayBuffer", "Sample", "SampleStatus"]
