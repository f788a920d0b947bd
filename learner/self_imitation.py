"""The self-imitation term trained on replayed samples (`buffer.self_imitation`): its config and pure functions.

Self-imitation learning (Oh et al. 2018, "Self-Imitation Learning", ICML, eq. 1-2) trains the policy on its own
past episodes with ``L_sil = E[-log pi_theta(a|s) * (R - V(s))+]``: only where the return ``R`` beats the current
value estimate ``V``, weighted by the (clipped) gap. For a language model the episode is a response, each of its
trained tokens ``y_t`` gets the sample's weight, and ``V`` is the prompt's value estimate that the buffer put in the
replayed sample's ``baseline`` (the mean reward of that prompt's newest group). SPEAR ("SPEAR: Self-imitation
with Progressive Exploration for Agentic Reinforcement Learning", 2025) applies the same replay of successful
trajectories to LLM agents.

Off-policy correctness: a replayed sample's behaviour logprobs come from a policy many versions old, so its
importance ratio ``pi_theta / pi_behav`` may be anywhere. The term uses no ratio at all, as in Oh et al. 2018
(section 3: SIL is derived as lower-bound soft Q-learning, where any past return is a lower bound of the optimal
value whatever policy produced it, so the replay needs no importance weights). What keeps it bounded instead is
the positive-part advantage, clipped at ``max_advantage``, and its coefficient; the PPO / TIS correction of the
run's ``learner.loss`` still applies to the fresh samples only, which never see this term.

Left out on purpose: SIL's value loss (relayrl trains no value function) and its prioritised replay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from base.config import StrictConfig

if TYPE_CHECKING:
    import torch


class SelfImitationLossConfig(StrictConfig):
    """``learner.self_imitation``: the weight of the self-imitation term and its advantage clip."""

    coef: float = Field(1.0, ge=0.0, le=100.0, description="weight of the self-imitation term on replayed samples "
                        "(buffer.self_imitation.fraction > 0 turns the replay on)")
    max_advantage: float = Field(1.0, gt=0.0, le=1e6, description="clip of the self-imitation advantage "
                                 "(R - V)+ (reward units)")


def sil_advantages(rewards: torch.Tensor, baselines: torch.Tensor, max_advantage: float) -> torch.Tensor:
    """``[B]`` self-imitation advantages ``clamp(R - V, 0, max_advantage)`` (Oh et al. 2018, eq. 1: the positive
    part, here also clipped above) of ``[B]`` rewards and value estimates (reward units).

    Raises:
        ValueError: the shapes differ or ``max_advantage <= 0``.
    """
    if rewards.shape != baselines.shape or rewards.dim() != 1:
        raise ValueError(f"sil_advantages: rewards {tuple(rewards.shape)} and baselines {tuple(baselines.shape)} "
                         "must both be [B]")
    if max_advantage <= 0:
        raise ValueError(f"learner.self_imitation.max_advantage = {max_advantage} must be > 0")
    return (rewards - baselines).clamp(min=0.0, max=max_advantage)


def split_replays(batch: list[list], max_advantage: float) -> tuple[list[list], list[float]]:
    """The fresh groups of a training ``batch`` (groups of `buffer.Sample`, the replays last, as
    `buffer.ReplayBuffer.take_batch` orders them) and every sample's self-imitation advantage in batch order: 0 for a
    fresh sample, `sil_advantages` of its reward and baseline for a replay.

    Raises:
        ValueError: a replayed group before a fresh one, or ``max_advantage <= 0``.
    """
    import torch

    fresh = [g for g in batch if not g[0].replayed]
    if any(s.replayed for g in batch[:len(fresh)] for s in g):
        raise ValueError("a training batch holds a replayed sample before a fresh group; the replays must come last "
                         "(buffer.ReplayBuffer.take_batch)")
    replays = [s for g in batch[len(fresh):] for s in g]
    sil = sil_advantages(torch.tensor([s.reward for s in replays]), torch.tensor([s.baseline or 0.0 for s in replays]),
                         max_advantage)
    return fresh, [0.0] * sum(len(g) for g in fresh) + sil.tolist()


def self_imitation_loss(logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, coef: float,
                        loss_normalizer: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """``coef * sum_{i,t} -A_i * log pi_theta(y_it) * mask_it / loss_normalizer``: SIL's policy term (Oh et al.
    2018, eq. 2) with no importance ratio (see the module docstring).

    Args:
        logprobs: ``[B, T]`` log pi_theta of the replayed tokens (with grad).
        mask: ``[B, T]`` 1 on the replayed samples' trained tokens, 0 elsewhere (fresh samples: all 0).
        advantages: ``[B]`` self-imitation advantages (`sil_advantages`; 0 for fresh samples).
        coef: ``learner.self_imitation.coef``.
        loss_normalizer: the denominator of the run's policy loss (default ``mask.sum()``), so the two terms add up
            to one token mean.

    Returns:
        ``(loss with grad, metrics)``: ``learner/sil_loss`` (the term's value), ``learner/sil_tokens`` (masked
        tokens with a positive advantage) and ``learner/sil_advantage_mean`` (token mean of ``A`` over ``mask``).

    Raises:
        ValueError: ``logprobs`` and ``mask`` differ in shape or ``advantages`` is not ``[B]``.
    """
    import torch

    if logprobs.shape != mask.shape or logprobs.dim() != 2 or tuple(advantages.shape) != tuple(logprobs.shape[:1]):
        raise ValueError(f"self_imitation_loss: logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must be "
                         f"[B, T] and advantages {tuple(advantages.shape)} [B]")
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)[:, None].expand_as(mask)
    n = mask.sum()
    normalizer = float(loss_normalizer) if loss_normalizer is not None else n.clamp(min=1.0)
    loss = coef * (-adv * logprobs * mask).sum() / normalizer
    with torch.no_grad():
        metrics = {"learner/sil_loss": float(loss.detach()), "learner/sil_tokens": float(((adv > 0) * mask).sum()),
                   "learner/sil_advantage_mean": float((adv * mask).sum() / n.clamp(min=1.0))}
    return loss, metrics
