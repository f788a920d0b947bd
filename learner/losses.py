"""Off-policy policy-gradient variants: pure functions, one per variant, in a registry.

Every variant takes a `PolicyLossInput` (shapes: B sequences, T right-padded response positions)
and returns ``(loss, metrics)``. The loss is ``sum(mask * per_token) / loss_normalizer``, so
micro-batches and ranks combine into one token mean. Three policies appear: pi_theta (the learner,
with grad), pi_prox (the proximal policy: the learner before this optimizer step) and pi_behav (the
rollout engine that sampled the tokens). "Decoupled PPO" (Hilton et al. 2022, "Batch size-invariance
for policy optimization"; AReaL, Fu et al. 2025) clips pi_theta/pi_prox and corrects pi_prox/pi_behav
separately, which is what each variant below does in its own way.

`k3_kl_penalty` is the optional KL-to-reference term the learner adds to any variant.

Left out on purpose: value-function losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

_LOG_CLAMP = 20.0


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
    """

    logprobs: torch.Tensor
    prox_logprobs: torch.Tensor
    behaviour_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    loss_normalizer: float | None = None

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.logprobs, self.prox_logprobs, self.behaviour_logprobs, self.mask)}
        if len(shapes) != 1 or self.logprobs.dim() != 2:
            raise ValueError(f"PolicyLossInput: [B, T] tensors must share one shape, got {sorted(shapes)}")
        if tuple(self.advantages.shape) != tuple(self.logprobs.shape[:1]):
            raise ValueError(f"advantages must be [B]={tuple(self.logprobs.shape[:1])}, got {tuple(self.advantages.shape)}")
        self.mask = self.mask.to(self.logprobs.dtype)

    @property
    def prox_vs_behav(self) -> torch.Tensor:
        """``[B, T]`` log(pi_prox / pi_behav), clamped to +-20, zero on masked tokens."""
        return ((self.prox_logprobs - self.behaviour_logprobs) * self.mask).clamp(-_LOG_CLAMP, _LOG_CLAMP)

    def seq_log_ratio(self, mean: bool) -> torch.Tensor:
        """``[B]`` sum (or mean) over trained tokens of log(pi_prox / pi_behav)."""
        s = self.prox_vs_behav.sum(1)
        return s / self.mask.sum(1).clamp(min=1.0) if mean else s.clamp(-_LOG_CLAMP, _LOG_CLAMP)


def _ppo_clip(inp: PolicyLossInput, clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip surrogate on pi_theta/pi_prox and the clipped-token indicator, ``[B, T]``."""
    ratio = torch.exp((inp.logprobs - inp.prox_logprobs).clamp(-_LOG_CLAMP, _LOG_CLAMP))
    adv = inp.advantages.to(ratio.dtype).unsqueeze(1)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(pg1, pg2), (pg2 > pg1).to(ratio.dtype)


def _finish(inp: PolicyLossInput, per_token: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor,
            extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked, normalised loss and the common ``off_policy/*`` metrics (``weight``/``kept`` are ``[B, T]``)."""
    mask = inp.mask
    n_tok = mask.sum()
    normalizer = float(inp.loss_normalizer) if inp.loss_normalizer is not None else n_tok.clamp(min=1.0)
    loss = (per_token * weight * kept * mask).sum() / normalizer
    with torch.no_grad():
        denom = n_tok.clamp(min=1.0)
        log_w = inp.prox_vs_behav
        metrics = {
            "off_policy/is_weight_mean": float((weight * mask).sum() / denom),
            "off_policy/masked_frac": float(((1 - kept) * mask).sum() / denom),
            "off_policy/mismatch_kl": float(((torch.exp(log_w) - 1 - log_w) * mask).sum() / denom),
            "learner/tokens": float(n_tok),
        }
        metrics.update({k: float((v * mask).sum() / denom) for k, v in extra.items()})
    return loss, metrics


def ppo_tis_loss(inp: PolicyLossInput, clip_low: float = 0.2, clip_high: float = 0.28, tis_cap: float = 2.0,
                 level: str = "token", **_: object) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO with truncated importance sampling (TIS).

    ``loss_t = min(w, C) * max(-A r_t, -A clip(r_t, 1-clip_low, 1+clip_high))`` with
    ``r_t = pi_theta/pi_prox`` and ``w = pi_prox/pi_behav`` per token (``level="token"``) or per sequence
    (product over its tokens, ``level="sequence"``), detached. Sources: Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training" (TIS); AReaL (decoupled PPO).

    Raises:
        ValueError: ``tis_cap <= 0`` or an unknown ``level``.
    """
    if tis_cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
    if level not in ("token", "sequence"):
        raise ValueError(f"level must be 'token' or 'sequence', got {level!r}")
    pg, clipped = _ppo_clip(inp, clip_low, clip_high)
    with torch.no_grad():
        raw = torch.exp(inp.prox_vs_behav if level == "token" else inp.seq_log_ratio(mean=False)[:, None].expand_as(pg))
        w = raw.clamp(max=tis_cap)
    return _finish(inp, pg, w, torch.ones_like(pg),
                   {"learner/pg_clipfrac": clipped, "off_policy/is_truncated_frac": (raw > tis_cap).to(pg.dtype)})


def ppo_seq_tis_loss(inp: PolicyLossInput, clip_low: float = 0.2, clip_high: float = 0.28, tis_cap: float = 2.0,
                     **_: object) -> tuple[torch.Tensor, dict[str, float]]:
    """`ppo_tis_loss` with one truncated weight per sequence (``level="sequence"``)."""
    return ppo_tis_loss(inp, clip_low, clip_high, tis_cap, level="sequence")


def ppo_uncorrected_loss(inp: PolicyLossInput, clip_low: float = 0.2, clip_high: float = 0.28,
                         **_: object) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip against pi_prox with no behaviour correction (weight 1): only sound on-policy."""
    pg, clipped = _ppo_clip(inp, clip_low, clip_high)
    one = torch.ones_like(pg)
    return _finish(inp, pg, one, one, {"learner/pg_clipfrac": clipped})


def _in_band_ppo(inp: PolicyLossInput, clip_low: float, clip_high: float, band_low: float, band_high: float,
                 log_ratio: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip on tokens where ``exp(log_ratio)`` (``[B, T]`` or ``[B, 1]``) is within the band; others masked."""
    if not 0 < band_low <= 1 <= band_high:
        raise ValueError(f"need 0 < band_low <= 1 <= band_high, got [{band_low}, {band_high}]")
    pg, clipped = _ppo_clip(inp, clip_low, clip_high)
    with torch.no_grad():
        r = torch.exp(log_ratio).expand_as(pg)
        kept = ((r >= band_low) & (r <= band_high)).to(pg.dtype)
    return _finish(inp, pg, torch.ones_like(pg), kept, {"learner/pg_clipfrac": clipped})


def icepop_loss(inp: PolicyLossInput, clip_low: float = 0.2, clip_high: float = 0.28, band_low: float = 0.5,
                band_high: float = 2.0, **_: object) -> tuple[torch.Tensor, dict[str, float]]:
    """IcePop: PPO-clip on tokens whose ``pi_prox/pi_behav`` lies in ``[band_low, band_high]``; others masked.

    Source: Ling Team 2025, "Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale
    Thinking Model" (IcePop: discard tokens with large training/inference probability discrepancy).

    Raises:
        ValueError: an empty band.
    """
    return _in_band_ppo(inp, clip_low, clip_high, band_low, band_high, inp.prox_vs_behav)


def seq_mask_loss(inp: PolicyLossInput, clip_low: float = 0.2, clip_high: float = 0.28, band_low: float = 0.5,
                  band_high: float = 2.0, **_: object) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequence-level geometric-mean masking: drop whole sequences whose per-token geometric mean of
    ``pi_prox/pi_behav`` (``exp(mean_t log ratio)``) leaves ``[band_low, band_high]``; PPO-clip on the rest.

    Source: the "geometric mean" rollout-correction mask of verl's rollout-correction guide
    (Liu et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the Inference-Training
    Mismatch").

    Raises:
        ValueError: an empty band.
    """
    return _in_band_ppo(inp, clip_low, clip_high, band_low, band_high, inp.seq_log_ratio(mean=True)[:, None])


def gspo_loss(inp: PolicyLossInput, clip_low: float = 3e-4, clip_high: float = 4e-4, tis_cap: float = 2.0,
              **_: object) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: clip the length-normalised sequence ratio ``s = exp(mean_t log(pi_theta/pi_prox))``.

    Token form ``s_t = sg(s) * pi_theta(y_t) / sg(pi_theta(y_t))`` (same value, per-token gradient),
    loss ``max(-A s_t, -A clip(s_t, 1-clip_low, 1+clip_high))``, times the sequence-level TIS weight
    ``min(pi_prox(y)/pi_behav(y), tis_cap)`` for the behaviour mismatch. Source: Zheng et al. 2025,
    "Group Sequence Policy Optimization" (clip range 3e-4 / 4e-4 there).

    Raises:
        ValueError: ``tis_cap <= 0``.
    """
    if tis_cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
    mask = inp.mask
    n = mask.sum(1).clamp(min=1.0)
    seq_log = ((inp.logprobs - inp.prox_logprobs) * mask).sum(1) / n
    s = torch.exp(seq_log.clamp(-_LOG_CLAMP, _LOG_CLAMP)).detach()[:, None]
    s_tok = s * torch.exp(inp.logprobs - inp.logprobs.detach())
    adv = inp.advantages.to(s_tok.dtype).unsqueeze(1)
    pg1, pg2 = -adv * s_tok, -adv * s_tok.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)
    with torch.no_grad():
        raw = torch.exp(inp.seq_log_ratio(mean=False))[:, None].expand_as(pg)
        w = raw.clamp(max=tis_cap)
    return _finish(inp, pg, w, torch.ones_like(pg),
                   {"learner/pg_clipfrac": (pg2 > pg1).to(pg.dtype),
                    "off_policy/is_truncated_frac": (raw > tis_cap).to(pg.dtype)})


def topr_loss(inp: PolicyLossInput, **_: object) -> tuple[torch.Tensor, dict[str, float]]:
    """TOPR, tapered off-policy REINFORCE: ``loss_t = -w * A * log pi_theta(y_t)`` where ``w = 1`` for
    ``A >= 0`` (plain REINFORCE) and ``w = sg(clip(pi_prox(y)/pi_behav(y), 0, 1))`` (sequence ratio) for
    ``A < 0``. Source: Le Roux et al. 2025, "Tapered Off-Policy REINFORCE".
    """
    with torch.no_grad():
        seq_w = torch.exp(inp.seq_log_ratio(mean=False)).clamp(max=1.0)
        w = torch.where(inp.advantages >= 0, torch.ones_like(seq_w), seq_w)[:, None].expand_as(inp.logprobs)
    adv = inp.advantages.to(inp.logprobs.dtype).unsqueeze(1)
    pg = -adv * inp.logprobs
    return _finish(inp, pg, w.to(pg.dtype), torch.ones_like(pg), {})


PolicyLoss = Callable[..., tuple[torch.Tensor, dict[str, float]]]

POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo_tis": ppo_tis_loss,
    "ppo_seq_tis": ppo_seq_tis_loss,
    "ppo": ppo_uncorrected_loss,
    "icepop": icepop_loss,
    "seq_mask": seq_mask_loss,
    "gspo": gspo_loss,
    "topr": topr_loss,
}
"""Registry keyed by `LearnerConfig.loss`. ``ppo`` is the only variant with no off-policy correction."""


def k3_kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  loss_normalizer: float | None = None) -> tuple[torch.Tensor, float]:
    """KL(pi_theta || pi_ref) by Schulman's k3 estimator ``exp(d) - d - 1``, ``d = log pi_ref - log pi_theta``.

    Args: ``[B, T]`` tensors; the masked sum is divided by ``loss_normalizer`` (default ``mask.sum()``).
    Returns ``(penalty with grad, its token mean as a float)``.

    Raises:
        ValueError: shapes differ.
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"k3_kl_penalty: shapes differ: {tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, "
                         f"{tuple(mask.shape)}")
    mask = mask.to(logprobs.dtype)
    d = (ref_logprobs - logprobs).clamp(-_LOG_CLAMP, _LOG_CLAMP)
    per_token = (torch.exp(d) - d - 1.0) * mask
    n = mask.sum().clamp(min=1.0)
    normalizer = float(loss_normalizer) if loss_normalizer is not None else n
    return per_token.sum() / normalizer, float(per_token.detach().sum() / n)
