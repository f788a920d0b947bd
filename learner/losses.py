"""Off-policy policy-gradient variants: one config class and one pure function per variant, in a registry.

Every variant is a pydantic config (its ``type`` tag and its own knobs, with defaults, bounds and a
description each) and a function ``fn(inp, cfg) -> (loss, metrics)`` taking a `PolicyLossInput`
(shapes: B sequences, T right-padded response positions) and that config. `POLICY_LOSSES` maps each
``type`` to both; ``learner.loss`` in the run config is the tagged union of the config classes
(`learner.config.LossConfig`), so a new loss is one config class, one function and one registry entry
(the function and its config here or in a module of its own, like `learner.entropy_losses`; the shared input,
config base and helpers are in `learner.loss_core`). The loss is ``sum(mask * per_token) / loss_normalizer``,
so micro-batches and ranks combine into one token mean; every metric a loss returns is a token mean over its
micro-batch (the learner combines them across micro-batches and ranks weighted by tokens).

Three policies appear: pi_theta (the learner, with grad), pi_prox (the proximal policy: the learner
before this optimizer step) and pi_behav (the rollout engine that sampled the tokens). "Decoupled PPO"
(Hilton et al. 2022, "Batch size-invariance for policy optimization"; AReaL, Fu et al. 2025) clips
pi_theta/pi_prox and corrects pi_prox/pi_behav separately, which is what each variant below does in its
own way.

`k3_kl_penalty` is the optional KL-to-reference term the learner adds to any variant. Every variant also takes
``token_selection_rho`` (train on the top-rho tokens by entropy, `learner.loss_core.high_entropy_selection`).

torch is imported inside the functions, so the config classes load with the run config without it.

Left out on purpose: value-function losses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Literal, NamedTuple

from pydantic import Field, model_validator

from learner.entropy_losses import (BapoLossConfig, ClipCovLossConfig, KlCovLossConfig, bapo_loss, clip_cov_loss,
                                    kl_cov_loss)
from learner.loss_core import (LOG_CLAMP, BandLoss, ClippedLoss, LossConfigBase, PolicyLossInput, TruncatedLoss,
                               finish_loss, ppo_clip_surrogate)
from learner.loss_core import k3_kl_per_token  # noqa: F401  (re-exported: learner.sentinel uses it from here)

if TYPE_CHECKING:
    import torch

# ---- shared pieces of this family's math ------------------------------------------------------------------

def _tis(inp: PolicyLossInput, cfg: PpoTisLossConfig | PpoSeqTisLossConfig, per_sequence: bool
         ) -> tuple[torch.Tensor, dict[str, float]]:
    """Decoupled PPO-clip times ``min(w, tis_cap)``, ``w`` per token or (``per_sequence``) per sequence."""
    import torch

    pg, clipped = ppo_clip_surrogate(inp, cfg.clip_low, cfg.clip_high)
    with torch.no_grad():
        raw = torch.exp(inp.seq_log_ratio(mean=False)[:, None].expand_as(pg) if per_sequence else inp.prox_vs_behav)
        w = raw.clamp(max=cfg.tis_cap)
    return finish_loss(inp, cfg, pg, w, torch.ones_like(pg),
                       {"learner/pg_clipfrac": clipped, "off_policy/is_truncated_frac": (raw > cfg.tis_cap).to(pg.dtype)})


def _in_band_ppo(inp: PolicyLossInput, cfg: IcepopLossConfig | SeqMaskLossConfig, log_ratio: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip on tokens where ``exp(log_ratio)`` (``[B, T]`` or ``[B, 1]``) is within the band; others masked."""
    import torch

    pg, clipped = ppo_clip_surrogate(inp, cfg.clip_low, cfg.clip_high)
    with torch.no_grad():
        r = torch.exp(log_ratio).expand_as(pg)
        kept = ((r >= cfg.band_low) & (r <= cfg.band_high)).to(pg.dtype)
    return finish_loss(inp, cfg, pg, torch.ones_like(pg), kept, {"learner/pg_clipfrac": clipped})


# ---- the variants: each a config class and a function -----------------------------------------------------

class PpoTisLossConfig(TruncatedLoss, ClippedLoss):
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


class PpoSeqTisLossConfig(TruncatedLoss, ClippedLoss):
    """Decoupled PPO with one truncated importance weight per sequence (`ppo_seq_tis_loss`)."""

    type: Literal["ppo_seq_tis"] = "ppo_seq_tis"


def ppo_seq_tis_loss(inp: PolicyLossInput, cfg: PpoSeqTisLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """`ppo_tis_loss` with one truncated weight per sequence: ``w = prod_t pi_prox(y_t)/pi_behav(y_t)``
    over its trained tokens (the sequence-level TIS of Yao et al. 2025), the same for all of its tokens."""
    return _tis(inp, cfg, per_sequence=True)


class PpoLossConfig(ClippedLoss):
    """PPO-clip with no behaviour correction (`ppo_uncorrected_loss`): only sound on-policy."""

    type: Literal["ppo"] = "ppo"


def ppo_uncorrected_loss(inp: PolicyLossInput, cfg: PpoLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip against pi_prox with no behaviour correction (weight 1): only sound on-policy.

    ``loss_t = max(-A r_t, -A clip(r_t, 1-clip_low, 1+clip_high))``, ``r_t = pi_theta/pi_prox``
    (Schulman et al. 2017, "Proximal Policy Optimization Algorithms"). Returns as `ppo_tis_loss`.
    """
    import torch

    pg, clipped = ppo_clip_surrogate(inp, cfg.clip_low, cfg.clip_high)
    one = torch.ones_like(pg)
    return finish_loss(inp, cfg, pg, one, one, {"learner/pg_clipfrac": clipped})


class IcepopLossConfig(BandLoss, ClippedLoss):
    """IcePop: PPO-clip on the tokens whose pi_prox/pi_behav is in a band, the others masked (`icepop_loss`)."""

    type: Literal["icepop"] = "icepop"


def icepop_loss(inp: PolicyLossInput, cfg: IcepopLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """IcePop: PPO-clip on tokens whose ``pi_prox/pi_behav`` lies in ``[band_low, band_high]``; others masked.

    Source: Ling Team 2025, "Every Step Evolves: Scaling Reinforcement Learning for Trillion-Scale
    Thinking Model" (IcePop: discard tokens with large training/inference probability discrepancy).
    Returns as `ppo_tis_loss` (``off_policy/masked_frac``: the masked tokens).
    """
    return _in_band_ppo(inp, cfg, inp.prox_vs_behav)


class SeqMaskLossConfig(BandLoss, ClippedLoss):
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


class GspoLossConfig(TruncatedLoss):
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
    s = torch.exp(seq_log.clamp(-LOG_CLAMP, LOG_CLAMP)).detach()[:, None]
    s_tok = s * torch.exp(inp.logprobs - inp.logprobs.detach())
    adv = inp.advantages.to(s_tok.dtype).unsqueeze(1)
    pg1, pg2 = -adv * s_tok, -adv * s_tok.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    pg = torch.maximum(pg1, pg2)
    with torch.no_grad():
        raw = torch.exp(inp.seq_log_ratio(mean=False))[:, None].expand_as(pg)
        w = raw.clamp(max=cfg.tis_cap)
    return finish_loss(inp, cfg, pg, w, torch.ones_like(pg),
                       {"learner/pg_clipfrac": (pg2 > pg1).to(pg.dtype),
                        "off_policy/is_truncated_frac": (raw > cfg.tis_cap).to(pg.dtype)})


class ToprLossConfig(LossConfigBase):
    """TOPR, tapered off-policy REINFORCE (`topr_loss`); no knobs of its own."""

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
    return finish_loss(inp, cfg, pg, w.to(pg.dtype), torch.ones_like(pg), {})


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
    RegisteredLoss(ClipCovLossConfig, clip_cov_loss),
    RegisteredLoss(KlCovLossConfig, kl_cov_loss),
    RegisteredLoss(BapoLossConfig, bapo_loss),
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
    d = (ref_logprobs - logprobs).clamp(-LOG_CLAMP, LOG_CLAMP)
    per_token = (torch.exp(d) - d - 1.0) * mask
    n = mask.sum().clamp(min=1.0)
    normalizer = float(loss_normalizer) if loss_normalizer is not None else n
    return per_token.sum() / normalizer, float(per_token.detach().sum() / n)
