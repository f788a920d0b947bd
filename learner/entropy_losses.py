"""Entropy-aware policy losses: Clip-Cov, KL-Cov and BAPO's adaptive clipping, each a config class and a pure
function registered in `learner.losses.POLICY_LOSSES` (``learner.loss.type``).

Clip-Cov and KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
Models", arXiv 2505.22617) act on the few tokens whose log-probability and advantage co-vary most: the paper
shows the policy's entropy falls in proportion to that covariance. Both keep relayrl's decoupled form: the
ratio is pi_theta/pi_prox and each token is weighted by the truncated importance weight ``min(pi_prox/pi_behav,
tis_cap)`` as in ``ppo_tis``, so they stay correct on stale or mismatched rollouts. BAPO (Xi et al. 2025)
clips the full off-policy ratio pi_theta/pi_behav with bounds it adapts per micro-batch.

The third method of issue 31, high-entropy token selection, is the ``token_selection_rho`` knob every loss has
(`learner.loss_core.high_entropy_selection`).

Every statistic here (covariance centring, top-k, BAPO's bound search) is over the micro-batch the loss sees:
a loss is a pure function, with no collective across micro-batches or ranks. Metrics are token means over the
micro-batch, as for every loss; ``learner/cov_max`` and BAPO's bounds are one value per micro-batch, so their
merged value is the token-weighted mean over micro-batches and ranks.

Left out on purpose: the registry (`learner.losses`), the dual-clip constant of the BAPO authors' verl recipe.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from learner.loss_core import (LOG_CLAMP, ClippedLoss, LossConfigBase, PolicyLossInput, TruncatedLoss, finish_loss,
                               ppo_clip_surrogate, truncated_is_weight)

if TYPE_CHECKING:
    import torch


def token_covariance(inp: PolicyLossInput) -> torch.Tensor:
    """``[B, T]`` centred covariance term of each trained token, 0 elsewhere (no grad).

    ``cov_t = (log pi_theta(y_t) - mean log pi_theta) * (A_t - mean A)``, both means over the trained tokens
    (``A_t`` is the token's sequence advantage); its token mean is the covariance of the two. Source: Cui et
    al. 2025 (the covariance that drives the entropy change), as verl's ``compute_policy_loss_clip_cov``
    computes it.
    """
    import torch

    with torch.no_grad():
        valid = inp.mask > 0
        n = valid.sum().clamp(min=1)
        lp = inp.logprobs.detach()
        adv = inp.advantages.to(lp.dtype)[:, None].expand_as(lp)
        lp_c = lp - torch.where(valid, lp, 0.0).sum() / n
        a_c = adv - torch.where(valid, adv, 0.0).sum() / n
        return torch.where(valid, lp_c * a_c, 0.0)


def _cov_metrics(cov: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """``learner/cov_mean`` (a token mean) and ``learner/cov_max`` (the micro-batch's largest) of ``cov``."""
    return {"learner/cov_mean": cov, "learner/cov_max": cov[valid].max() if bool(valid.any()) else cov.sum() * 0}


# ---- Clip-Cov -----------------------------------------------------------------------------------------------

class ClipCovLossConfig(TruncatedLoss, ClippedLoss):
    """Clip-Cov on decoupled PPO with token-level TIS (`clip_cov_loss`).

    Raises (validation):
        ValueError: ``clip_cov_lb >= clip_cov_ub`` (an empty band).
    """

    type: Literal["clip_cov"] = "clip_cov"
    clip_cov_ratio: float = Field(2e-4, gt=0.0, le=1.0, description="fraction of trained tokens whose gradient "
                                  "Clip-Cov removes, drawn at random among those with covariance in the band "
                                  "(paper: 2e-4); at least one token per micro-batch")
    clip_cov_lb: float = Field(1.0, description="lower end of the covariance band of candidate tokens (paper: 1)")
    clip_cov_ub: float = Field(5.0, description="upper end of the covariance band of candidate tokens (paper: 5)")

    @model_validator(mode="after")
    def _band_is_not_empty(self) -> ClipCovLossConfig:
        """A band with ``lb >= ub`` holds no token: Clip-Cov would silently be ``ppo_tis``."""
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"learner.loss.clip_cov_lb = {self.clip_cov_lb:g} must be below clip_cov_ub = "
                             f"{self.clip_cov_ub:g} (paper: 1 and 5)")
        return self


def clip_cov_loss(inp: PolicyLossInput, cfg: ClipCovLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Clip-Cov: ``ppo_tis`` with the gradient of a few high-covariance tokens removed.

    Among the trained tokens that PPO-clip leaves unclipped and whose `token_covariance` lies strictly inside
    ``(clip_cov_lb, clip_cov_ub)``, ``max(1, int(clip_cov_ratio * n_tokens))`` are drawn uniformly at random
    (torch's global generator) and drop out of the loss, value and gradient, as in the authors' code; every
    other token's loss is ``min(w_t, tis_cap) * max(-A r_t, -A clip(r_t, 1-clip_low, 1+clip_high))``
    (`ppo_tis_loss`). Source: Cui et al. 2025, arXiv 2505.22617 (Clip-Cov), and verl's
    ``compute_policy_loss_clip_cov``.

    Returns ``(loss, metrics)``: as `ppo_tis_loss`, plus ``learner/cov_clipped_frac`` (tokens removed),
    ``learner/cov_mean`` and ``learner/cov_max``.
    """
    import torch

    pg, clipped = ppo_clip_surrogate(inp, cfg.clip_low, cfg.clip_high)
    w, truncated = truncated_is_weight(inp, cfg.tis_cap)
    with torch.no_grad():
        cov = token_covariance(inp)
        valid = inp.mask > 0
        n_tok = int(valid.sum())
        band = valid & (clipped == 0) & (cov > cfg.clip_cov_lb) & (cov < cfg.clip_cov_ub)
        idx = torch.nonzero(band.flatten()).squeeze(1)
        n_clip = min(max(int(cfg.clip_cov_ratio * n_tok), 1), len(idx)) if n_tok else 0
        chosen = idx[torch.randperm(len(idx), device=idx.device)[:n_clip]]
        removed = torch.zeros(pg.numel(), dtype=pg.dtype, device=pg.device)
        removed[chosen] = 1.0
        removed = removed.view_as(pg)
    return finish_loss(inp, cfg, pg * (1 - removed), w, torch.ones_like(pg),
                       {"learner/pg_clipfrac": clipped, "off_policy/is_truncated_frac": truncated,
                        "learner/cov_clipped_frac": removed, **_cov_metrics(cov, valid)})


# ---- KL-Cov -------------------------------------------------------------------------------------------------

class KlCovLossConfig(TruncatedLoss):
    """KL-Cov on the decoupled policy gradient with token-level TIS (`kl_cov_loss`)."""

    type: Literal["kl_cov"] = "kl_cov"
    kl_cov_ratio: float = Field(2e-3, gt=0.0, le=1.0, description="fraction of trained tokens, those of largest "
                                "covariance, that get the KL penalty (paper: 2e-3 for 7B models, 2e-4 for 32B); at "
                                "least one token per micro-batch")
    kl_cov_coef: float = Field(1.0, ge=0.0, description="weight beta of the |log pi_theta - log pi_prox| penalty "
                               "(paper: 1)")


def kl_cov_loss(inp: PolicyLossInput, cfg: KlCovLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """KL-Cov: the unclipped policy gradient, plus a KL penalty on the tokens of largest covariance.

    ``loss_t = min(w_t, tis_cap) * (-A r_t + beta * |log pi_theta(y_t) - log pi_prox(y_t)| * 1[t in top-k])``,
    ``r_t = pi_theta/pi_prox``, the top-k the ``max(1, int(kl_cov_ratio * n_tokens))`` trained tokens of
    largest `token_covariance`. As in the paper there is no PPO clip: the penalty replaces it on the tokens
    that drive entropy down. The penalty and its gradient are 0 while pi_theta is pi_prox, so it acts from the
    second optimizer step of a batch on (``learner.ppo_minibatches > 1``), like the paper's pi_old. Source: Cui
    et al. 2025, arXiv 2505.22617 (KL-Cov), and verl's ``compute_policy_loss_kl_cov``.

    Returns ``(loss, metrics)``: the ``off_policy/*`` of `ppo_tis_loss`, ``learner/cov_kl_frac`` (tokens
    penalised), ``learner/cov_kl`` (mean penalty ``|log pi_theta - log pi_prox|`` over them, per token of the
    micro-batch), ``learner/cov_mean`` and ``learner/cov_max``.
    """
    import torch

    log_r = (inp.logprobs - inp.prox_logprobs).clamp(-LOG_CLAMP, LOG_CLAMP)
    adv = inp.advantages.to(log_r.dtype).unsqueeze(1)
    w, truncated = truncated_is_weight(inp, cfg.tis_cap)
    with torch.no_grad():
        cov = token_covariance(inp)
        valid = inp.mask > 0
        n_tok = int(valid.sum())
        penalised = torch.zeros(cov.numel(), dtype=log_r.dtype, device=log_r.device)
        if n_tok:
            k = max(1, int(cfg.kl_cov_ratio * n_tok))
            positions = torch.nonzero(valid.flatten()).squeeze(1)
            penalised[positions[torch.topk(cov.flatten()[positions], k).indices]] = 1.0
        penalised = penalised.view_as(cov)
    penalty = log_r.abs() * penalised
    per_token = -adv * torch.exp(log_r) + cfg.kl_cov_coef * penalty
    return finish_loss(inp, cfg, per_token, w, torch.ones_like(per_token),
                       {"off_policy/is_truncated_frac": truncated, "learner/cov_kl_frac": penalised,
                        "learner/cov_kl": penalty.detach(), **_cov_metrics(cov, valid)})


# ---- BAPO ---------------------------------------------------------------------------------------------------

class BapoLossConfig(LossConfigBase):
    """BAPO: PPO-clip of pi_theta/pi_behav with clip bounds adapted per micro-batch (`bapo_loss`). The bounds
    are on the ratio itself (0.6 means ``r >= 0.6``), not distances from 1 as ``clip_low`` elsewhere.

    Raises (validation):
        ValueError: a start above its maximum.
    """

    type: Literal["bapo"] = "bapo"
    pos_share_target: float = Field(0.5, gt=0.0, lt=1.0, description="rho_0: the share of the clipped objective's "
                                    "gradient weight that positive-advantage tokens must reach (paper: 0.5)")
    ratio_low_start: float = Field(0.6, gt=0.0, le=1.0, description="a-: first lower bound of pi_theta/pi_behav "
                                   "(paper: 0.6)")
    ratio_low_max: float = Field(0.9, gt=0.0, le=1.0, description="b-: highest lower bound (paper: 0.9)")
    ratio_low_step: float = Field(0.05, gt=0.0, le=1.0, description="delta_2: lower-bound step (authors' recipe: "
                                  "0.05)")
    ratio_high_start: float = Field(1.2, ge=1.0, description="a+: first upper bound of pi_theta/pi_behav "
                                    "(paper: 1.2)")
    ratio_high_max: float = Field(3.0, ge=1.0, description="b+: highest upper bound (paper: 3.0)")
    ratio_high_step: float = Field(0.05, gt=0.0, le=10.0, description="delta_1: upper-bound step (authors' recipe: "
                                   "0.05)")

    @model_validator(mode="after")
    def _starts_within_their_range(self) -> BapoLossConfig:
        """Each bound moves up from its start to its maximum: a start above it leaves no range."""
        for name in ("low", "high"):
            start, top = getattr(self, f"ratio_{name}_start"), getattr(self, f"ratio_{name}_max")
            if start > top:
                raise ValueError(f"learner.loss.ratio_{name}_start = {start:g} is above ratio_{name}_max = {top:g}: "
                                 "the bound moves up from its start, so set start <= max (paper: [0.6, 0.9] and "
                                 "[1.2, 3.0])")
        return self


def bapo_bounds(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cfg: BapoLossConfig
                ) -> tuple[float, float, float]:
    """BAPO's clip bounds for one micro-batch: ``(c_low, c_high, positive share)``.

    Args:
        ratio: ``[B, T]`` pi_theta/pi_behav (no grad needed); advantages ``[B]``; mask ``[B, T]``.

    The positive share at bounds ``(c_low, c_high)`` is ``rho = P / (P + N)``, ``P = sum r_t A_t`` over the
    tokens with ``A_t > 0`` and ``r_t <= c_high`` and ``N = sum r_t |A_t|`` over those with ``A_t < 0`` and
    ``r_t >= c_low``: the tokens PPO-clip leaves a gradient, each weighted by its gradient's size ``r |A|``
    (1 when there is no such token). Starting from ``(a-, a+)``, while ``rho < pos_share_target`` and a bound
    can move, both move up one step (``c_high += delta_1`` up to ``b+``: more positive tokens keep their
    gradient; ``c_low += delta_2`` up to ``b-``: more negative ones lose it). Source: Xi et al. 2025, "BAPO:
    Stabilizing Off-Policy Reinforcement Learning for LLMs via Balanced Policy Optimization with Adaptive
    Clipping", arXiv 2510.18927, Algorithm 1, as we read it (the authors' verl recipe moves the lower bound to
    its maximum first, then the upper; and sums clipped values rather than gradient weights).
    """
    import torch

    with torch.no_grad():
        valid = mask > 0
        r = ratio.detach()[valid].double()
        adv = advantages.detach().to(r.dtype)[:, None].expand_as(ratio)[valid]
        steps = max(math.ceil((cfg.ratio_low_max - cfg.ratio_low_start) / cfg.ratio_low_step - 1e-9),
                    math.ceil((cfg.ratio_high_max - cfg.ratio_high_start) / cfg.ratio_high_step - 1e-9), 0)
        lows = [min(cfg.ratio_low_start + k * cfg.ratio_low_step, cfg.ratio_low_max) for k in range(steps + 1)]
        highs = [min(cfg.ratio_high_start + k * cfg.ratio_high_step, cfg.ratio_high_max) for k in range(steps + 1)]
        lo, hi = (torch.tensor(b, dtype=r.dtype, device=r.device)[:, None] for b in (lows, highs))
        weight = r * adv.abs()
        pos = (weight * ((adv > 0) & (r <= hi))).sum(1)  # [steps + 1]
        neg = (weight * ((adv < 0) & (r >= lo))).sum(1)
        total = pos + neg
        share = torch.where(total > 0, pos / total.clamp(min=1e-300), torch.ones_like(total))
        reached = torch.nonzero(share >= cfg.pos_share_target)
        k = int(reached[0]) if len(reached) else steps
        return lows[k], highs[k], float(share[k])


def bapo_loss(inp: PolicyLossInput, cfg: BapoLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """BAPO: ``loss_t = max(-A r_t, -A clip(r_t, c_low, c_high))`` with ``r_t = pi_theta/pi_behav`` and the
    micro-batch's bounds from `bapo_bounds`.

    The ratio is to the behaviour policy, as in the paper (its pi_rollout), not decoupled: within a batch's
    first optimizer step pi_theta is pi_prox, so a clip of pi_theta/pi_prox could never bind and the bounds
    would have nothing to balance; the clip is itself the off-policy control (no TIS weight). Source: Xi et al.
    2025, arXiv 2510.18927 (BAPO's objective; the dual-clip constant of the authors' recipe is left out).

    Returns ``(loss, metrics)``: the ``off_policy/*`` of `ppo_tis_loss` (weight 1), ``learner/pg_clipfrac``,
    the chosen bounds ``learner/bapo_clip_low`` / ``learner/bapo_clip_high`` and the positive share they reach,
    ``learner/bapo_pos_share``.
    """
    import torch

    ratio = torch.exp((inp.logprobs - inp.behaviour_logprobs).clamp(-LOG_CLAMP, LOG_CLAMP))
    c_low, c_high, share = bapo_bounds(ratio, inp.advantages, inp.mask, cfg)
    adv = inp.advantages.to(ratio.dtype).unsqueeze(1)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(c_low, c_high)
    one = torch.ones_like(pg1)
    return finish_loss(inp, cfg, torch.maximum(pg1, pg2), one, one,
                       {"learner/pg_clipfrac": (pg2 > pg1).to(pg1.dtype), "learner/bapo_clip_low": one * c_low,
                        "learner/bapo_clip_high": one * c_high, "learner/bapo_pos_share": one * share})
