"""The one record that crosses actor boundaries: a generated response and what produced it.

A `Sample` is produced by a rollout worker (rollout/), stored by the replay buffer (buffer/) and
consumed by the learner (learner/). It deliberately holds only token-level facts (ids, masks,
behaviour logprobs, per-token policy versions) plus the reward and a status: no tensors, no text
beyond what metrics and debugging need, so it pickles small and fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SampleStatus = Literal["completed", "truncated", "aborted", "failed"]


@dataclass
class Sample:
    """One response to one prompt, with everything the learner needs to train on it.

    Attributes:
        prompt_id: stable key of the prompt in its dataset (e.g. ``"train/123"``).
        group_id: key of the group this sample belongs to (all ``n`` samples of one prompt
            dispatched together share it).
        prompt_ids: prompt token ids after the chat template, length P.
        response_ids: generated token ids, length R (R may be 0).
        behaviour_logprobs: log pi_behaviour(token) of each response token under the policy that
            sampled it (vLLM, before temperature scaling is undone: see rollout/), length R.
        policy_versions: policy version that generated each response token, length R. A sample
            generated across a weight update holds more than one version.
        loss_mask: 1 for response tokens that are trained on, 0 otherwise, length R.
        reward: scalar reward of the whole response.
        status: ``completed`` (stop token), ``truncated`` (hit max tokens), ``aborted`` or
            ``failed`` (reward or generation error; not trained on).
        answer: the reference answer, kept for metrics.
        response_text: decoded response, kept for logging.
        correct: whether the strict-parse answer matched exactly (held-out accuracy uses this).
        baseline: per-prompt value estimate set by the buffer when SPO's value tracker is on
            (``learner.advantage = "spo"``), read before this sample's own reward; else None.
        error: why the sample failed (status ``failed``), e.g. the reward function raised.
        turn_rewards: per-turn rewards of a multi-turn episode (``reward`` is their sum; the response then
            interleaves sampled tokens with observation tokens, the latter at loss mask 0); empty for a
            single-turn sample.
        replayed: a self-imitation replay of a sample trained at an earlier step (`buffer.self_imitation`); its
            ``baseline`` is then its prompt's value estimate at the replay, and the learner trains it with the
            self-imitation term only.
    """

    prompt_id: str
    group_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    behaviour_logprobs: list[float]
    policy_versions: list[int]
    loss_mask: list[int] = field(default_factory=list)
    reward: float = 0.0
    status: SampleStatus = "completed"
    answer: str = ""
    response_text: str = ""
    correct: bool = False
    baseline: float | None = None
    error: str = ""
    turn_rewards: list[float] = field(default_factory=list)
    replayed: bool = False

    def __post_init__(self) -> None:
        n = len(self.response_ids)
        if not self.loss_mask:
            self.loss_mask = [1] * n
        for name in ("behaviour_logprobs", "policy_versions", "loss_mask"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"Sample {self.group_id}: {name} has length {len(getattr(self, name))}, "
                    f"expected {n} (one per response token)"
                )

    @property
    def oldest_version(self) -> int:
        """Oldest policy version among the response tokens (-1 for an empty response)."""
        return min(self.policy_versions) if self.policy_versions else -1

    def staleness(self, learner_version: int) -> int:
        """Policy lag in versions: ``learner_version - oldest_version`` (0 = on-policy)."""
        if not self.policy_versions:
            return 0
        return learner_version - self.oldest_version

    @property
    def num_tokens(self) -> int:
        """Prompt plus response length in tokens."""
        return len(self.prompt_ids) + len(self.response_ids)


def scored_rewards(group: list[Sample]) -> list[float]:
    """Rewards of the samples of ``group`` whose reward function did not fail (status ``failed`` samples
    carry a placeholder 0.0 that no statistic may count)."""
    return [s.reward for s in group if s.status != "failed"]
