"""Advantage estimators: pure functions from rewards to per-sample advantages.

Only group-relative estimators live here (no value network). Each takes rewards shaped
``[num_groups, group_size]`` and returns advantages of the same shape plus a metrics dict.

Left out on purpose: GAE / critic-based estimators, per-token advantages.
"""

from __future__ import annotations

import torch


def grpo_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, normalize_std: bool = True
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO group-normalised advantages: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``.

    Source: Shao et al. 2024, "DeepSeekMath" (GRPO), eq. for outcome supervision. ``std`` is the
    unbiased sample standard deviation (as in DeepSeekMath's and verl's implementations). With
    ``normalize_std=False`` this is Dr.GRPO's mean-only baseline (Liu et al. 2025).

    Args:
        rewards: ``[num_groups, group_size]`` float rewards.
        eps: added to the std so all-equal groups give zero advantage, not NaN.
        normalize_std: divide by the group std (GRPO) or not (Dr.GRPO).

    Returns:
        ``(advantages [num_groups, group_size], metrics)``; metrics hold
        ``learner/zero_variance_group_frac`` (groups with all-equal rewards: no gradient signal).

    Raises:
        ValueError: ``rewards`` is not 2-D or a group has fewer than 2 samples.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group-relative advantages need group_size >= 2, got {rewards.shape[1]}")
    rewards = rewards.float()
    mean = rewards.mean(dim=1, keepdim=True)
    adv = rewards - mean
    std = rewards.std(dim=1, keepdim=True, unbiased=True)
    if normalize_std:
        adv = adv / (std + eps)
    zero_var = (std.squeeze(1) < eps).float().mean().item()
    return adv, {"learner/zero_variance_group_frac": zero_var}


def rloo_advantages(rewards: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """RLOO leave-one-out baseline: ``A_i = r_i - mean_{j != i} r_j = n/(n-1) * (r_i - mean(r))``.

    Source: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs" (RLOO). Shapes as `grpo_advantages`.

    Raises:
        ValueError: ``rewards`` is not ``[num_groups, group_size >= 2]``.
    """
    adv, m = grpo_advantages(rewards, normalize_std=False)
    n = rewards.shape[1]
    return adv * (n / (n - 1)), m


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE++-baseline: subtract the group mean, then normalise by the whole batch's std.

    ``A = (a - mean_batch(a)) / (std_batch(a) + eps)`` with ``a = r - mean_group(r)``. Source: Hu et al.
    2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models".
    Shapes as `grpo_advantages`; a batch with all-equal centred rewards gives zeros.

    Raises:
        ValueError: ``rewards`` is not ``[num_groups, group_size >= 2]``.
    """
    centred, m = grpo_advantages(rewards, normalize_std=False)
    std = centred.std(unbiased=True) if centred.numel() > 1 else torch.tensor(0.0)
    return (centred - centred.mean()) / (std + eps), m


def spo_advantages(rewards: torch.Tensor, baselines: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, dict[str, float]]:
    """SPO advantages: ``A = r - b(prompt)`` from a persistent per-prompt value tracker, then
    normalised by the whole batch's std.

    Source: Xu et al. 2025, "Single-stream Policy Optimization", eq. 5-6 (batch-level
    normalisation). Groups may have one sample: the baseline does not come from the group.

    Args:
        rewards, baselines: ``[num_groups, group_size]`` (``group_size >= 1``).

    Returns:
        ``(advantages, metrics)``; ``learner/zero_variance_group_frac`` as in `grpo_advantages` for
        groups of 2 or more (0 for single-sample groups).

    Raises:
        ValueError: shapes differ or are not 2-D.
    """
    if rewards.dim() != 2 or baselines.shape != rewards.shape:
        raise ValueError(f"rewards and baselines must share a [G, n] shape, got {tuple(rewards.shape)} "
                         f"and {tuple(baselines.shape)}")
    adv = rewards.float() - baselines.float()
    std = adv.std(unbiased=True) if adv.numel() > 1 else torch.tensor(0.0)
    zero_var = (rewards.std(dim=1, unbiased=True) < eps).float().mean().item() if rewards.shape[1] > 1 else 0.0
    return adv / (std + eps), {"learner/zero_variance_group_frac": zero_var}


ADVANTAGE_ESTIMATORS = {
    "grpo": lambda r, b=None: grpo_advantages(r, normalize_std=True),
    "drgrpo": lambda r, b=None: grpo_advantages(r, normalize_std=False),
    "rloo": lambda r, b=None: rloo_advantages(r),
    "reinforce_pp": lambda r, b=None: reinforce_pp_baseline_advantages(r),
    "spo": lambda r, b: spo_advantages(r, b),
}
"""Registry keyed by `LearnerConfig.advantage`: ``fn(rewards [G, n], baselines [G, n] | None)``."""
