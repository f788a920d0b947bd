"""Advantage estimators: pure functions from rewards to per-sample advantages.

Only group-relative estimators live here (no value network). Each takes rewards shaped
``[num_groups, group_size]`` and returns advantages of the same shape plus a metrics dict. Groups of
different sizes (Knapsack-style rollout budgets) are padded to the largest and passed with a
``mask`` of the same shape (1 = a real sample); padded entries get advantage 0. Without a mask every
entry is real. A ``valid`` tensor of the same shape (1 = the reward counts) marks samples whose
reward function failed (0): their stored reward is not a reward, so they are left out of every
group and batch statistic and get advantage 0, like padding; a group with fewer than 2 valid samples
has no baseline and gets zeros (SPO: only a group with none). Group-size checks count real samples,
valid or not.

Every estimator is a pydantic config (its ``type`` tag and its own knobs) and a pure function, paired in
`ADVANTAGE_ESTIMATORS`; ``learner.advantage`` in the run config is the tagged union of the config classes
(`learner.config.AdvantageConfig`), so a new estimator is one config class, one function and one registry
entry, here. `batch_advantages` builds the padded tensors from ragged lists of rewards.

torch is imported inside the functions, so the config classes load with the run config without it.

Left out on purpose: GAE / critic-based estimators, per-token advantages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, NamedTuple

from pydantic import Field

from base.config import StrictConfig

if TYPE_CHECKING:
    import torch


class AdvantageConfigBase(StrictConfig):
    """Base of every advantage estimator's config: its ``type`` (the `ADVANTAGE_ESTIMATORS` key), then its knobs."""

    type: str


class _StdNormalised(AdvantageConfigBase):
    """An estimator that divides by a standard deviation."""

    eps: float = Field(1e-6, gt=0.0, le=1.0, description="added to the std it divides by, so all-equal rewards give "
                       "advantage 0, not NaN")


def _mask_like(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    import torch

    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, group_size], got shape {tuple(rewards.shape)}")
    if mask is None:
        return torch.ones_like(rewards, dtype=torch.float32)
    if mask.shape != rewards.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from rewards shape {tuple(rewards.shape)}")
    return mask.float()


def _counted(rewards: torch.Tensor, mask: torch.Tensor | None, valid: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(real, counted)``, each ``[G, n]``: real samples, and real samples whose reward is valid."""
    real = _mask_like(rewards, mask)
    if valid is None:
        return real, real
    if valid.shape != rewards.shape:
        raise ValueError(f"valid shape {tuple(valid.shape)} differs from rewards shape {tuple(rewards.shape)}")
    return real, real * valid.float()


def _group_stats(rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group ``(count, mean, unbiased std)``, each ``[G, 1]``, over the masked entries."""
    n = mask.sum(dim=1, keepdim=True)
    mean = (rewards * mask).sum(dim=1, keepdim=True) / n.clamp(min=1.0)
    var = (((rewards - mean) * mask) ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1.0)
    return n, mean, var.sqrt()


def _batch_std(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased std over the masked entries of the whole batch (0 for fewer than 2 entries)."""
    import torch

    n = mask.sum()
    if n < 2:
        return torch.tensor(0.0)
    mean = (values * mask).sum() / n
    return ((((values - mean) * mask) ** 2).sum() / (n - 1)).sqrt()


class GrpoAdvantageConfig(_StdNormalised):
    """GRPO: group mean baseline, divided by the group std (`grpo_advantages`)."""

    type: Literal["grpo"] = "grpo"


class DrGrpoAdvantageConfig(AdvantageConfigBase):
    """Dr. GRPO: group mean baseline, no std division (`grpo_advantages` with ``normalize_std=False``)."""

    type: Literal["drgrpo"] = "drgrpo"


def grpo_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, normalize_std: bool = True, mask: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO group-normalised advantages: ``A_i = (r_i - mean(r_group)) / (std(r_group) + eps)``.

    Source: Shao et al. 2024, "DeepSeekMath" (GRPO), eq. for outcome supervision. ``std`` is the
    unbiased sample standard deviation (as in DeepSeekMath's and verl's implementations). With
    ``normalize_std=False`` this is Dr.GRPO's mean-only baseline (Liu et al. 2025).

    Args:
        rewards: ``[num_groups, group_size]`` float rewards.
        eps: added to the std so all-equal groups give zero advantage, not NaN.
        normalize_std: divide by the group std (GRPO) or not (Dr.GRPO).
        mask: ``[num_groups, group_size]``, 1 for real samples (ragged groups), or None.
        valid: ``[num_groups, group_size]``, 0 for samples whose reward failed (left out), or None.

    Returns:
        ``(advantages [num_groups, group_size], metrics)``; metrics hold
        ``learner/zero_variance_group_frac`` (groups with all-equal valid rewards, or fewer than 2
        valid samples: no gradient signal).

    Raises:
        ValueError: ``rewards`` is not 2-D, a mask's shape differs, or a group has fewer than 2 samples.
    """
    real, counted = _counted(rewards, mask, valid)
    if real.sum(dim=1).min() < 2:
        raise ValueError(f"group-relative advantages need groups of >= 2 samples, got a group of "
                         f"{int(real.sum(dim=1).min())}")
    _, mean, std = _group_stats(rewards.float(), counted)
    adv = (rewards.float() - mean) * counted
    if normalize_std:
        adv = adv / (std + eps)
    zero_var = (std.squeeze(1) < eps).float().mean().item()
    return adv, {"learner/zero_variance_group_frac": zero_var}


class RlooAdvantageConfig(AdvantageConfigBase):
    """RLOO: leave-one-out group baseline (`rloo_advantages`)."""

    type: Literal["rloo"] = "rloo"


def rloo_advantages(rewards: torch.Tensor, mask: torch.Tensor | None = None, valid: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """RLOO leave-one-out baseline: ``A_i = r_i - mean_{j != i} r_j = n/(n-1) * (r_i - mean(r))``.

    Source: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs" (RLOO). Shapes, ``mask`` and ``valid`` as
    `grpo_advantages`; ``n`` is each group's own count of valid samples.

    Raises:
        ValueError: as `grpo_advantages`.
    """
    adv, m = grpo_advantages(rewards, normalize_std=False, mask=mask, valid=valid)
    n = _counted(rewards, mask, valid)[1].sum(dim=1, keepdim=True)
    return adv * (n / (n - 1).clamp(min=1.0)), m  # n <= 1: the advantage is already 0


class ReinforcePpAdvantageConfig(_StdNormalised):
    """REINFORCE++-baseline: group mean baseline, divided by the batch std (`reinforce_pp_baseline_advantages`)."""

    type: Literal["reinforce_pp"] = "reinforce_pp"


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor, eps: float = 1e-6, mask: torch.Tensor | None = None, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """REINFORCE++-baseline: subtract the group mean, then normalise by the whole batch's std.

    ``A = (a - mean_batch(a)) / (std_batch(a) + eps)`` with ``a = r - mean_group(r)``. Source: Hu et al.
    2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models".
    Shapes, ``mask`` and ``valid`` as `grpo_advantages` (the batch statistics are over valid samples
    too); a batch with all-equal centred rewards gives zeros.

    Raises:
        ValueError: as `grpo_advantages`.
    """
    centred, m = grpo_advantages(rewards, normalize_std=False, mask=mask, valid=valid)
    counted = _counted(rewards, mask, valid)[1]
    batch_mean = (centred * counted).sum() / counted.sum().clamp(min=1.0)
    return (centred - batch_mean) * counted / (_batch_std(centred, counted) + eps), m


class SpoAdvantageConfig(_StdNormalised):
    """SPO: per-prompt tracked value baseline, divided by the batch std (`spo_advantages`); needs
    ``buffer.value_tracker``."""

    type: Literal["spo"] = "spo"


def spo_advantages(rewards: torch.Tensor, baselines: torch.Tensor, eps: float = 1e-6,
                   mask: torch.Tensor | None = None, valid: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """SPO advantages: ``A = r - b(prompt)`` from a persistent per-prompt value tracker, then
    normalised by the whole batch's std.

    Source: Xu et al. 2025, "Single-stream Policy Optimization", eq. 5-6 (batch-level
    normalisation). Groups may have one sample: the baseline does not come from the group.

    Args:
        rewards, baselines: ``[num_groups, group_size]`` (``group_size >= 1``).
        mask, valid: as `grpo_advantages`; failed samples get 0 and stay out of the batch std.

    Returns:
        ``(advantages, metrics)``; ``learner/zero_variance_group_frac`` as in `grpo_advantages` over
        groups of 2 or more valid samples (0 when there are none).

    Raises:
        ValueError: shapes differ or are not 2-D.
    """
    if rewards.dim() != 2 or baselines.shape != rewards.shape:
        raise ValueError(f"rewards and baselines must share a [G, n] shape, got {tuple(rewards.shape)} "
                         f"and {tuple(baselines.shape)}")
    counted = _counted(rewards, mask, valid)[1]
    adv = (rewards.float() - baselines.float()) * counted
    n, _, std = _group_stats(rewards.float(), counted)
    multi = n.squeeze(1) >= 2
    zero_var = (std.squeeze(1)[multi] < eps).float().mean().item() if multi.any() else 0.0
    return adv / (_batch_std(adv, counted) + eps), {"learner/zero_variance_group_frac": zero_var}


# ---- the registry: each estimator's config class, and how it calls the function -------------------------

class RegisteredEstimator(NamedTuple):
    """An `ADVANTAGE_ESTIMATORS` entry: an estimator's config class and
    ``fn(rewards, baselines, mask, valid, cfg) -> (advantages, metrics)`` on ``[G, n]`` tensors."""

    config: type[AdvantageConfigBase]
    fn: Callable[..., tuple[torch.Tensor, dict[str, float]]]

    def __call__(self, rewards: torch.Tensor, baselines: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 valid: torch.Tensor | None = None, cfg: AdvantageConfigBase | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """``fn`` on ``[G, n]`` tensors (``baselines`` only for ``spo``); ``cfg`` None: the estimator's defaults.

        Raises:
            TypeError: ``cfg`` is another estimator's config.
            ValueError: what the estimator raises.
        """
        cfg = self.config() if cfg is None else cfg
        if not isinstance(cfg, self.config):
            raise TypeError(f"advantage estimator {self.config.__name__} got a {type(cfg).__name__}")
        return self.fn(rewards, baselines, mask, valid, cfg)


def _by_type(*entries: RegisteredEstimator) -> dict[str, RegisteredEstimator]:
    return {e.config.model_fields["type"].default: e for e in entries}


ADVANTAGE_ESTIMATORS: dict[str, RegisteredEstimator] = _by_type(
    RegisteredEstimator(GrpoAdvantageConfig, lambda r, b, mask, valid, c: grpo_advantages(r, c.eps, True, mask, valid)),
    RegisteredEstimator(DrGrpoAdvantageConfig,
                        lambda r, b, mask, valid, c: grpo_advantages(r, normalize_std=False, mask=mask, valid=valid)),
    RegisteredEstimator(RlooAdvantageConfig, lambda r, b, mask, valid, c: rloo_advantages(r, mask, valid)),
    RegisteredEstimator(ReinforcePpAdvantageConfig,
                        lambda r, b, mask, valid, c: reinforce_pp_baseline_advantages(r, c.eps, mask, valid)),
    RegisteredEstimator(SpoAdvantageConfig, lambda r, b, mask, valid, c: spo_advantages(r, b, c.eps, mask, valid)),
)
"""Every advantage estimator by its ``type`` (``learner.advantage.type``): the one list of them. An entry is
called as ``entry(rewards [G, n], baselines [G, n] | None, mask=None, valid=None, cfg=None)``."""


def batch_advantages(estimator: AdvantageConfigBase | str, rewards: list[list[float]],
                     baselines: list[list[float]] | None = None, valid: list[list[bool]] | None = None
                     ) -> tuple[list[float], dict[str, float]]:
    """Advantages of a batch of possibly ragged groups, flattened in sample order.

    Args:
        estimator: the estimator's config (``learner.advantage``), or its `ADVANTAGE_ESTIMATORS` key for its
            defaults.
        rewards: one list of rewards per group (sizes may differ).
        baselines: per-sample baselines in the same layout (``spo``), or None.
        valid: per-sample flags in the same layout, False where the reward function failed (the
            sample is left out of the statistics and gets advantage 0), or None (all valid).

    Returns:
        ``(advantages, metrics)``: one advantage per sample, groups concatenated in order.

    Raises:
        ValueError: an empty batch or group, or what the estimator raises.
        KeyError: an unknown estimator name.
    """
    import torch

    cfg = ADVANTAGE_ESTIMATORS[estimator].config() if isinstance(estimator, str) else estimator
    if not rewards or any(not g for g in rewards):
        raise ValueError(f"batch_advantages needs non-empty groups, got sizes {[len(g) for g in rewards]}")
    width = max(len(g) for g in rewards)
    pad = lambda rows: torch.tensor([list(g) + [0.0] * (width - len(g)) for g in rows], dtype=torch.float32)  # noqa: E731
    mask = torch.tensor([[1.0] * len(g) + [0.0] * (width - len(g)) for g in rewards])
    adv, metrics = ADVANTAGE_ESTIMATORS[cfg.type](pad(rewards), pad(baselines) if baselines is not None else None,
                                                  mask=mask, valid=pad(valid) if valid is not None else None, cfg=cfg)
    return adv[mask.bool()].tolist(), metrics
