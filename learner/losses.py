"""Off-policy policy-gradient variants: one config class and one pure function per variant, in a registry.

Every variant is a pydantic config (its ``type`` tag and its own knobs, with defaults, bounds and a
description each) and a function ``fn(inp, cfg) -> (loss, metrics)`` taking a `PolicyLossInput`
(shapes: B sequences, T right-padded response positions) and that config. `POLICY_LOSSES` maps each
``type`` to both; ``learner.loss`` in the run config is the tagged union of the config classes
(`learner.config.LossConfig`), so a new loss is one config class, one function and one registry entry,
here. The loss is ``sum(mask * per_token) / loss_normalizer``, so micro-batches and ranks combine into one
token mean; every metric a loss returns is a token mean over its micro-batch (the learner combines them
across micro-batches and ranks weighted by tokens).

Three policies appear: pi_theta (the learner, with grad), pi_prox (the proximal policy: the learner
before this optimizer step) and pi_behav (the rollout engine that sampled the tokens). "Decoupled PPO"
(Hilton et al. 2022, "Batch size-invariance for policy optimization"; AReaL, Fu et al. 2025) clips
pi_theta/pi_prox and corrects pi_prox/pi_behav separately, which is what each variant below does in its
own way.

`k3_kl_penalty` is the optional KL-to-reference term the learner adds to any variant.

torch is imported inside the functions, so the config classes load with the run config without it.

Left out on purpose: value-function losses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple

from pydantic import Field, model_validator

from base.config import StrictConfig

if TYPE_CHECKING:
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

    Raises:
        ValueError: the ``[B, T]`` tensors differ in shape or ``advantages`` is not ``[B]``.
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


# ---- knobs shared by several variants -------------------------------------------------------------------

class LossConfigBase(StrictConfig):
    """Base of every policy loss's config: its ``type`` (the `POLICY_LOSSES` key) comes first, its knobs after."""

    type: str


class _Clipped(LossConfigBase):
    """A loss that PPO-clips the ratio pi_theta/pi_prox to ``[1 - clip_low, 1 + clip_high]``."""

    clip_low: float = Field(0.2, ge=0.0, le=1.0, description="clip below 1 of the ratio pi_theta/pi_prox")
    clip_high: float = Field(0.28, ge=0.0, le=10.0, description="clip above 1 of the ratio (DAPO's clip-higher, "
                             "Yu et al. 2025)")


class _Truncated(LossConfigBase):
    """A loss that weights by a truncated importance ratio ``min(pi_prox/pi_behav, tis_cap)``."""

    tis_cap: float = Field(2.0, gt=0.0, description="truncated importance sampling cap C on pi_prox/pi_behav")


class _Band(LossConfigBase):
    """A loss that masks what lies outside a band of pi_prox/pi_behav (never empty: it contains 1)."""

    band_low: float = Field(0.5, gt=0.0, le=1.0, description="lowest kept pi_prox/pi_behav")
    band_high: float = Field(2.0, ge=1.0, description="highest kept pi_prox/pi_behav")


# ---- shared pieces of the math ----------------------------------------------------------------------------

def _ppo_clip(inp: PolicyLossInput, clip_low: float, clip_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO-clip surrogate on pi_theta/pi_prox and the clipped-token indicator, ``[B, T]``."""
    import torch

    ratio = torch.exp((inp.logprobs - inp.prox_logprobs).clamp(-_LOG_CLAMP, _LOG_CLAMP))
    adv = inp.advantages.to(ratio.dtype).unsqueeze(1)
    pg1, pg2 = -adv * ratio, -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(pg1, pg2), (pg2 > pg1).to(ratio.dtype)


def k3_kl_per_token(log_ratio: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(behaviour || policy) per token (Schulman, "Approximating KL divergence", 2020):
    ``r - 1 - log r`` with ``log_ratio = log r = log pi - log mu`` (``[B, T]``, nats); unbiased and >= 0 for
    tokens sampled from ``mu``. Used for ``off_policy/mismatch_kl`` and the sentinel's gap."""
    import torch

    return torch.exp(log_ratio) - 1 - log_ratio


def _finish(inp: PolicyLossInput, per_token: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor,
            extra: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Masked, normalised loss and the common ``off_policy/*`` metrics (``weight``/``kept`` are ``[B, T]``)."""
    import torch

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
            "off_policy/mismatch_kl": float((k3_kl_per_token(log_w) * mask).sum() / denom),
            "learner/tokens": float(n_tok),
        }
        metrics.update({k: float((v * mask).sum() / denom) for k, v in extra.items()})
    return loss, metrics


def _tis(inp: PolicyLossInput, cfg: PpoTisLossConfig | PpoSeqTisLossConfig, per_sequence: bool
         ) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO-clip times ``min(w, tis_cap)``, ``w`` per token or (``per_sequence``) per sequence."""
    import torch

    pg, clipped = _ppo_clip(inp, cfg.clip_low, cfg.clip_high)
    with torch.no_grad():
        raw = torch.exp(inp.seq_log_ratio(mean=False)[:, None].expand_as(pg) if per_sequence else inp.prox_vs_behav)
        w = raw.clamp(max=cfg.tis_cap)
    return _finish(inp, pg, w, torch.ones_like(pg),
                   {"learner/pg_clipfrac": clipped, "off_policy/is_truncated_frac": (raw > cfg.tis_cap).to(pg.dtype)})


def _in_band_ppo(inp: PolicyLossInput, cfg: IcepopLossConfig | SeqMaskLossConfig, log_ratio: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip on tokens where ``exp(log_ratio)`` (``[B, T]`` or ``[B, 1]``) is within the band; others masked."""
    import torch

    pg, clipped = _ppo_clip(inp, cfg.clip_low, cfg.clip_high)
    with torch.no_grad():
        r = torch.exp(log_ratio).expand_as(pg)
        kept = ((r >= cfg.band_low) & (r <= cfg.band_high)).to(pg.dtype)
    return _finish(inp, pg, torch.ones_like(pg), kept, {"learner/pg_clipfrac": clipped})


# ---- the variants: each a config class and a function -----------------------------------------------------

class PpoTisLossConfig(_Truncated, _Clipped):
    """Decoupled PPO with token-level truncated importance sampling (`ppo_tis_loss`)."""

    type: Literal["ppo_tis"] = "ppo_tis"


def ppo_tis_loss(inp: PolicyLossInput, cfg: PpoTisLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO with truncated importance sampling (TIS), one weight per token.

    ``loss_t = min(w_t, C) * max(-A r_t, -A clip(r_t, 1-clip_low, 1+clip_high))`` with
    ``r_t = pi_theta/pi_prox`` and ``w_t = pi_prox/pi_behav`` of the token, detached; ``C = tis_cap``.
    Sources: Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training"
    (TIS); AReaL (decoupled PPO).

    Returns ``(loss, metrics)``: the scalar loss (with grad) and token means over ``inp.mask``
    (``off_policy/*``, ``learner/pg_clipfrac``) plus ``learner/tokens``.
    """
    return _tis(inp, cfg, per_sequence=False)


class PpoSeqTisLossConfig(_Truncated, _Clipped):
    """Decoupled PPO with one truncated importance weight per sequence (`ppo_seq_tis_loss`)."""

    type: Literal["ppo_seq_tis"] = "ppo_seq_tis"


def ppo_seq_tis_loss(inp: PolicyLossInput, cfg: PpoSeqTisLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """`ppo_tis_loss` with one truncated weight per sequence: ``w = prod_t pi_prox(y_t)/pi_behav(y_t)``
    over its trained tokens (the sequence-level TIS of Yao et al. 2025), the same for all of its tokens."""
    return _tis(inp, cfg, per_sequence=True)


class PpoLossConfig(_Clipped):
    """PPO-clip with no behaviour correction (`ppo_uncorrected_loss`): only sound on-policy."""

    type: Literal["ppo"] = "ppo"


def ppo_uncorrected_loss(inp: PolicyLossInput, cfg: PpoLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip against pi_prox with no behaviour correction (weight 1): only sound on-policy.

    ``loss_t = max(-A r_t, -A clip(r_t, 1-clip_low, 1+clip_high))``, ``r_t = pi_theta/pi_prox``
    (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"). Returns as `ppo_tis_loss`.
    """
    import torch

    pg, clipped = _ppo_clip(inp, cfg.clip_low, cfg.clip_high)
    one = torch.ones_like(pg)
    return _finish(inp, pg, one, one, {"learner/pg_clipfrac": clipped})


class IcepopLossConfig(_Band, _Clipped):
    """IcePop: PPO-clip on the tokens whose pi_prox/pi_behav is in a band, the others masked (`icepop_loss`)."""

    type: Literal["icepop"] = "icepop"


def icepop_loss(inp: PolicyLossInput, cfg: IcepopLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """IcePop: PPO-clip on tokens whose ``pi_prox/pi_behav`` lies in ``[band_low, band_high]``; others masked.

    Source: Ling Team 2025, "Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale
    Thinking Model" (IcePop: discard tokens with large training/inference probability discrepancy).
    Returns as `ppo_tis_loss` (``off_policy/masked_frac``: the masked tokens).
    """
    return _in_band_ppo(inp, cfg, inp.prox_vs_behav)


class SeqMaskLossConfig(_Band, _Clipped):
    """Sequence-level geometric-mean masking with PPO-clip on the kept sequences (`seq_mask_loss`)."""

    type: Literal["seq_mask"] = "seq_mask"


def seq_mask_loss(inp: PolicyLossInput, cfg: SeqMaskLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequence-level geometric-mean masking: drop whole sequences whose per-token geometric mean of
    ``pi_prox/pi_behav`` (``exp(mean_t log ratio)``) leaves ``[band_low, band_high]``; PPO-clip on the rest.

    Source: the "geometric mean" rollout-correction mask of verl's rollout-correction guide
    (Liu et al. 2025, "When Speed Kills Stability: Demystifying RL Collapse from the Inference-Training
    Mismatch"). Returns as `icepop_loss`.
    """
    return _in_band_ppo(inp, cfg, inp.seq_log_ratio(mean=True)[:, None])


class GspoLossConfig(_Truncated):
    """GSPO: PPO-clip of the length-normalised sequence ratio, whose clip range is ~1e-4 wide (`gspo_loss`).

    Raises (validation):
        ValueError: ``clip_low`` or ``clip_high`` above `MAX_CLIP` (a token-level range never clips).
    """

    type: Literal["gspo"] = "gspo"
    clip_low: float = Field(3e-4, ge=0.0, description="clip below 1 of the sequence ratio (GSPO paper: 3e-4)")
    clip_high: float = Field(4e-4, ge=0.0, description="clip above 1 of the sequence ratio (GSPO paper: 4e-4)")

    MAX_CLIP: ClassVar[float] = 0.01
    """Largest clip GSPO accepts: its sequence ratio moves ~1e-4 per step, so a token-level 0.2 never clips."""

    @model_validator(mode="after")
    def _clips_a_sequence_ratio(self) -> GspoLossConfig:
        """GSPO's ratio is a per-token geometric mean; a token-level range (0.2) would never clip it."""
        if max(self.clip_low, self.clip_high) > self.MAX_CLIP:
            raise ValueError(f"learner.loss = 'gspo' clips the length-normalised sequence ratio, whose range is "
                             f"~1e-4 wide, but learner.loss.clip_low / clip_high = {self.clip_low:g} / "
                             f"{self.clip_high:g} (> {self.MAX_CLIP:g}) would never clip; leave them unset (3e-4 / "
                             f"4e-4, GSPO paper) or set values <= {self.MAX_CLIP:g}")
        return self


def gspo_loss(inp: PolicyLossInput, cfg: GspoLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO: clip the length-normalised sequence ratio ``s = exp(mean_t log(pi_theta/pi_prox))``.

    Token form ``s_t = sg(s) * pi_theta(y_t) / sg(pi_theta(y_t))`` (same value, per-token gradient),
    loss ``max(-A s_t, -A clip(s_t, 1-clip_low, 1+clip_high))``, times the sequence-level TIS weight
    ``min(pi_prox(y)/pi_behav(y), tis_cap)`` for the behaviour mismatch. Source: Zheng et al. 2025,
    "Group Sequence Policy Optimization" (clip range 3e-4 / 4e-4 there). Returns as `ppo_tis_loss`.
    """
    import torch

    mask = inp.mask
    n = mask.sum(1).clamp(min=1.0)
    seq_log = ((inp.logprobs - inp.prox_logprobs) * mask).sum(1) / n
    s = torch.exp(seq_log.clamp(-_LOG_CLAMP, _LOG_CLAMP)).detach()[:, None]
    s_tok = s * torch.exp(inp.logprobs - inp.logprobs.detach())
    adv = inp.advantages.to(s_tok.dtype).unsqueeze(1)
    pg1, pg2 = -adv * s_tok, -adv * s_tok.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)
    with torch.no_grad():
        raw = torch.exp(inp.seq_log_ratio(mean=False))[:, None].expand_as(pg)
        w = raw.clamp(max=cfg.tis_cap)
    return _finish(inp, pg, w, torch.ones_like(pg),
                   {"learner/pg_clipfrac": (pg2 > pg1).to(pg.dtype),
                    "off_policy/is_truncated_frac": (raw > cfg.tis_cap).to(pg.dtype)})


class ToprLossConfig(LossConfigBase):
    """TOPR, tapered off-policy REINFORCE (`topr_loss`); no knobs."""

    type: Literal["topr"] = "topr"


def topr_loss(inp: PolicyLossInput, cfg: ToprLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """TOPR, tapered off-policy REINFORCE: ``loss_t = -w * A * log pi_theta(y_t)`` where ``w = 1`` for
    ``A >= 0`` (plain REINFORCE) and ``w = sg(clip(pi_prox(y)/pi_behav(y), 0, 1))`` (sequence ratio) for
    ``A < 0``. Source: Le Roux et al. 2025, "Tapered Off-Policy REINFORCE". Returns as `ppo_tis_loss`.
    """
    import torch

    with torch.no_grad():
        seq_w = torch.exp(inp.seq_log_ratio(mean=False)).clamp(max=1.0)
        w = torch.where(inp.advantages >= 0, torch.ones_like(seq_w), seq_w)[:, None].expand_as(inp.logprobs)
    adv = inp.advantages.to(inp.logprobs.dtype).unsqueeze(1)
    pg = -adv * inp.logprobs
    return _finish(inp, pg, w.to(pg.dtype), torch.ones_like(pg), {})


# ---- the registry -----------------------------------------------------------------------------------------

class RegisteredLoss(NamedTuple):
    """A `POLICY_LOSSES` entry: a loss's config class and its function ``fn(inp, cfg) -> (loss, metrics)``."""

    config: type[LossConfigBase]
    fn: Callable[..., tuple[torch.Tensor, dict[str, float]]]

    def __call__(self, inp: PolicyLossInput, cfg: LossConfigBase | None = None
                 ) -> tuple[torch.Tensor, dict[str, float]]:
        """``fn(inp, cfg)``; ``cfg`` None: the loss's defaults.

        Raises:
            TypeError: ``cfg`` is another loss's config.
        """
        cfg = self.config() if cfg is None else cfg
        if not isinstance(cfg, self.config):
            raise TypeError(f"{self.fn.__name__} takes a {self.config.__name__}, got a {type(cfg).__name__}")
        return self.fn(inp, cfg)


def _by_type(*entries: RegisteredLoss) -> dict[str, RegisteredLoss]:
    return {e.config.model_fields["type"].default: e for e in entries}


POLICY_LOSSES: dict[str, RegisteredLoss] = _by_type(
    RegisteredLoss(PpoTisLossConfig, ppo_tis_loss),
    RegisteredLoss(PpoSeqTisLossConfig, ppo_seq_tis_loss),
    RegisteredLoss(PpoLossConfig, ppo_uncorrected_loss),
    RegisteredLoss(IcepopLossConfig, icepop_loss),
    RegisteredLoss(SeqMaskLossConfig, seq_mask_loss),
    RegisteredLoss(GspoLossConfig, gspo_loss),
    RegisteredLoss(ToprLossConfig, topr_loss),
)
"""Every policy loss by its ``type`` (``learner.loss.type``): the one list of them. ``ppo`` is the only variant
with no off-policy correction."""


def policy_loss(inp: PolicyLossInput, cfg: LossConfigBase) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss ``cfg`` configures (a config class of `POLICY_LOSSES`, e.g. ``LearnerConfig.loss``) on ``inp``.

    Returns ``(loss, metrics)`` as the variant does (see `ppo_tis_loss`).

    Raises:
        KeyError: ``cfg.type`` is not registered.
    """
    return POLICY_LOSSES[cfg.type](inp, cfg)


def k3_kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  loss_normalizer: float | None = None) -> tuple[torch.Tensor, float]:
    """KL(pi_theta || pi_ref) by Schulman's k3 estimator ``exp(d) - d - 1``, ``d = log pi_ref - log pi_theta``.

    Args: ``[B, T]`` tensors; the masked sum is divided by ``loss_normalizer`` (default ``mask.sum()``).
    Returns ``(penalty with grad, its token mean as a float)``.

    Raises:
        ValueError: shapes differ.
    """
    import torch

    if logprobs.shape != ref_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"k3_kl_penalty: shapes differ: {tuple(logprobs.shape)}, {tuple(ref_logprobs.shape)}, "
                         f"{tuple(mask.shape)}")
    mask = mask.to(logprobs.dtype)
    d = (ref_logprobs - logprobs).clamp(-_LOG_CLAMP, _LOG_CLAMP)
    per_token = (torch.exp(d) - d - 1.0) * mask
    n = mask.sum().clamp(min=1.0)
    normalizer = float(loss_normalizer) if loss_normalizer is not None else n
    return per_token.sum() / normalizer, float(per_token.detach().sum() / n)
