"""What every policy loss shares: its input (`PolicyLossInput`), the base of its config (`LossConfigBase`, with
the knob every variant has: high-entropy token selection) and the shared pieces of the math.

The variants themselves and their registry are in `learner.losses` (the PPO / importance-weight family) and
`learner.entropy_losses` (Clip-Cov, KL-Cov, BAPO); both build on this module, which imports neither, so the
registry in `learner.losses` can list them all without an import cycle. Shapes: B sequences, T right-padded
response positions.

torch is imported inside the functions, so the config classes load with the run config without it.

Left out on purpose: the registry and every loss variant (`learner.losses`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import Field

from base.config import StrictConfig

if TYPE_CHECKING:
    import torch

LOG_CLAMP = 20.0
"""Log-ratios are clamped to +-LOG_CLAMP nats before ``exp`` (e^20 ~ 5e8: finite in fp32 and bf16)."""


@dataclass
class PolicyLossInput:
    """Inputs of every policy loss.

    Attributes:
        logprobs: ``[B, T]`` log pi_theta of the sampled tokens (with grad).
        prox_logprobs: ``[B, T]`` log pi_prox (no grad).
        behaviour_logprobs: ``[B, T]`` log pi_behav reported by the rollout engine.
        advantages: ``[B]`` sequence advantages.
        mask: ``[B, T]`` 1 on trained tokens.
        loss_normalizer: token count the masked sum is divided by (default: ``mask.sum()``).
        entropy: ``[B, T]`` entropy of pi_theta at each position (nats, no grad; stored detached) or None;
            needed only by ``token_selection_rho < 1`` (`high_entropy_selection`).

    Raises:
        ValueError: the ``[B, T]`` tensors differ in shape or ``advantages`` is not ``[B]``.
    """

    logprobs: torch.Tensor
    prox_logprobs: torch.Tensor
    behaviour_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    loss_normalizer: float | None = None
    entropy: torch.Tensor | None = None

    def __post_init__(self) -> None:
        tensors = (self.logprobs, self.prox_logprobs, self.behaviour_logprobs, self.mask)
        shapes = {tuple(t.shape) for t in (*tensors, *([self.entropy] if self.entropy is not None else []))}
        if len(shapes) != 1 or self.logprobs.dim() != 2:
            raise ValueError(f"PolicyLossInput: [B, T] tensors must share one shape, got {sorted(shapes)}")
        if tuple(self.advantages.shape) != tuple(self.logprobs.shape[:1]):
            raise ValueError(f"advantages must be [B]={tuple(self.logprobs.shape[:1])}, got {tuple(self.advantages.shape)}")
        self.mask = self.mask.to(self.logprobs.dtype)
        if self.entropy is not None:
            self.entropy = self.entropy.detach()

    @property
    def prox_vs_behav(self) -> torch.Tensor:
        """``[B, T]`` log(pi_prox / pi_behav), clamped to +-20, zero on masked tokens."""
        return ((self.prox_logprobs - self.behaviour_logprobs) * self.mask).clamp(-LOG_CLAMP, LOG_CLAMP)

    def seq_log_ratio(self, mean: bool) -> torch.Tensor:
        """``[B]`` sum (or mean) over trained tokens of log(pi_prox / pi_behav)."""
        s = self.prox_vs_behav.sum(1)
        return s / self.mask.sum(1).clamp(min=1.0) if mean else s.clamp(-LOG_CLAMP, LOG_CLAMP)


# ---- knobs shared by several variants -------------------------------------------------------------------

class LossConfigBase(StrictConfig):
    """Base of every policy loss's config: its ``type`` (the `POLICY_LOSSES` key) comes first, its knobs after.

    ``token_selection_rho`` is a knob of every variant rather than a variant of its own: the paper applies
    its selection to a PPO objective, and as a mask on the per-token loss it composes with any of them
    (`high_entropy_selection`).
    """

    type: str
    token_selection_rho: float = Field(
        1.0, gt=0.0, le=1.0, description="train only on this top fraction of each micro-batch's trained tokens "
        "by policy entropy (Wang et al. 2025, 'Beyond the 80/20 Rule': 0.2); 1: every token")


class ClippedLoss(LossConfigBase):
    """A loss that PPO-clips the ratio pi_theta/pi_prox to ``[1 - clip_low, 1 + clip_high]``."""

    clip_low: float = Field(0.2, ge=0.0, le=1.0, description="clip below 1 of the ratio pi_theta/pi_prox")
    clip_high: float = Field(0.28, ge=0.0, le=10.0, description="clip above 1 of the ratio (DAPO's clip-higher, "
                             "Yu et al. 2025)")


class TruncatedLoss(LossConfigBase):
    """A loss that weights by a truncated importance ratio ``min(pi_prox/pi_behav, tis_cap)``."""

    tis_cap: float = Field(2.0, gt=0.0, description="truncated importance sampling cap C on pi_prox/pi_behav")


class BandLoss(LossConfigBase):
    """A loss that masks what lies outside a band of pi_prox/pi_behav (never empty: it contains 1)."""

    band_low: float = Field(0.5, gt=0.0, le=1.0, description="lowest kept pi_prox/pi_behav")
    band_high: float = Field(2.0, ge=1.0, description="highest kept pi_prox/pi_behav")


# ---- shared pieces of the math ----------------------------------------------------------------------------

def ppo_clip_surrogate(inp: PolicyLossInput, clip_low: float, clip_high: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip surrogate on pi_theta/pi_prox and the clipped-token indicator, ``[B, T]`` each:
    ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`` (Schulman et al. 2017)."""
    import torch

    ratio = torch.exp((inp.logprobs - inp.prox_logprobs).clamp(-LOG_CLAMP, LOG_CLAMP))
    adv = inp.advantages.to(ratio.dtype).unsqueeze(1)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(pg1, pg2), (pg2 > pg1).to(ratio.dtype)


def truncated_is_weight(inp: PolicyLossInput, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` token-level TIS weight ``min(pi_prox/pi_behav, cap)`` (no grad) and its truncated-token
    indicator (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training")."""
    import torch

    with torch.no_grad():
        raw = torch.exp(inp.prox_vs_behav)
        return raw.clamp(max=cap), (raw > cap).to(inp.logprobs.dtype)


def k3_kl_per_token(log_ratio: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(behaviour || policy) per token (Schulman, "Approximating KL divergence", 2020):
    ``r - 1 - log r`` with ``log_ratio = log r = log pi - log mu`` (``[B, T]``, nats); unbiased and >= 0 for
    tokens sampled from ``mu``. Used for ``off_policy/mismatch_kl`` and the sentinel's gap."""
    import torch

    return torch.exp(log_ratio) - 1 - log_ratio


def high_entropy_selection(entropy: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    """``[B, T]`` 1 on the top-``rho`` fraction of the trained tokens by entropy, 0 elsewhere (no grad).

    Keeps the ``k = ceil(rho * n)`` highest-entropy of the ``n`` tokens where ``mask`` is 1 (at least one
    when ``n > 0``; tokens tied with the k-th are kept too). The paper's objective multiplies each token's
    PPO term by ``1[H_t >= tau_rho]``, ``tau_rho`` the batch's top-rho entropy quantile, and keeps the
    normaliser of all tokens (Wang et al. 2025, "Beyond the 80/20 Rule: High-Entropy Minority Tokens Drive
    Effective Reinforcement Learning for LLM Reasoning", arXiv 2506.01939; rho = 0.2 there). Here the
    batch is the micro-batch a loss sees (no collective inside a loss).

    Raises:
        ValueError: ``rho`` outside ``(0, 1]`` or shapes differ.
    """
    import torch

    if not 0.0 < rho <= 1.0:
        raise ValueError(f"token_selection_rho = {rho} must be in (0, 1] (0.2: the paper's top 20% of tokens)")
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} and mask {tuple(mask.shape)} must share one shape")
    with torch.no_grad():
        valid = mask > 0
        n = int(valid.sum())
        if n == 0:
            return torch.zeros_like(mask, dtype=entropy.dtype)
        k = max(1, math.ceil(rho * n - 1e-9))  # 1e-9: 0.2 * 15 is 3.0000000000000004 in floats
        threshold = torch.topk(entropy[valid], k).values[-1]
        return (valid & (entropy >= threshold)).to(entropy.dtype)


def finish_loss(inp: PolicyLossInput, cfg: LossConfigBase, per_token: torch.Tensor, weight: torch.Tensor,
                kept: torch.Tensor, extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked, normalised loss and the common ``off_policy/*`` metrics of any variant.

    ``loss = sum(per_token * weight * kept * selected * mask) / normaliser``, ``selected`` the high-entropy
    tokens of ``cfg.token_selection_rho`` (all when 1). ``weight`` (importance weights) and ``kept``
    (off-policy masking) are ``[B, T]``; ``extra`` maps metric keys to ``[B, T]`` tensors (or scalars) whose
    token means over ``inp.mask`` join the metrics.

    Raises:
        ValueError: ``token_selection_rho < 1`` and ``inp.entropy`` is None.
    """
    import torch

    mask = inp.mask
    n_tok = mask.sum()
    normalizer = float(inp.loss_normalizer) if inp.loss_normalizer is not None else n_tok.clamp(min=1.0)
    rho = cfg.token_selection_rho
    if rho < 1.0:
        if inp.entropy is None:
            raise ValueError(f"learner.loss.token_selection_rho = {rho} needs the policy's entropy per token: "
                             "pass PolicyLossInput(entropy=[B, T]) (the learner does), or set it to 1")
        selected = high_entropy_selection(inp.entropy, mask, rho)
        per_token = per_token * selected
        extra = {**extra, "learner/entropy_selected_frac": selected}
    loss = (per_token * weight * kept * mask).sum() / normalizer
    with torch.no_grad():
        denom = n_tok.clamp(min=1.0)
        log_w = inp.prox_vs_behav
        metrics = {
            "off_policy/is_weight_mean": float((weight * mask).sum() / denom),
            "off_policy/masked_frac": float(((1 - kept) * mask).sum() / denom),
            "off_policy/mismatch_kl": float((k3_kl_per_token(log_w) * mask).sum() / denom),
            "learner/tokens": float(n_tok),
        }
        metrics.update({k: float((v * mask).sum() / denom) for k, v in extra.items()})
    return loss, metrics
