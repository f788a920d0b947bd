"""Policy-gradient losses: pure functions on per-token tensors.

Shapes: B sequences, T response positions (right-padded); ``mask`` is 1 on trained tokens.

Left out on purpose: the decoupled-PPO / TOPR / IcePop variants (a later addition), value losses.
"""

from __future__ import annotations

import torch


def ppo_clip_tis_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    tis_cap: float = 2.0,
    loss_normalizer: float | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip surrogate weighted by a truncated importance sampling (TIS) correction.

    Per token t with ``ratio = exp(logprobs - old_logprobs)``:

        pg_t  = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))   (PPO, Schulman 2017)
        w_t   = min(exp(old_logprobs - behaviour_logprobs), tis_cap)   (detached)
        loss  = sum_t mask_t * w_t * pg_t / loss_normalizer  [+ kl_coef * k3(ref || pi)]

    The TIS weight corrects for the rollout engine's behaviour policy differing from the learner's
    (policy lag and bf16/fp32 numerics): Yao et al. 2025, "Your Efficient RL Framework Secretly
    Brings You Off-Policy RL Training" (truncated importance sampling). ``clip_high > clip_low``
    gives DAPO's clip-higher. The KL term uses Schulman's k3 estimator
    ``exp(ref - logp) - (ref - logp) - 1``.

    Args:
        logprobs: ``[B, T]`` learner log-probs of the sampled tokens (with grad).
        old_logprobs: ``[B, T]`` proximal-policy log-probs (no grad); equal to ``logprobs.detach()``
            when each batch gets a single optimizer step.
        behaviour_logprobs: ``[B, T]`` log-probs reported by the rollout engine.
        advantages: ``[B]`` sequence advantages (broadcast to every token).
        mask: ``[B, T]`` 1/0 float or bool mask of trained tokens.
        clip_low, clip_high: PPO clip range below / above 1.
        tis_cap: upper truncation of the importance weight (C in the TIS paper), > 0.
        loss_normalizer: divide the masked sum by this many tokens (e.g. the global batch's token
            count, so micro-batches and ranks combine into one token mean); default ``mask.sum()``.
        ref_logprobs: ``[B, T]`` reference-model log-probs, needed when ``kl_coef > 0``.
        kl_coef: weight of the KL-to-reference penalty.

    Returns:
        ``(loss scalar, metrics)`` with metric values as Python floats over masked tokens.

    Raises:
        ValueError: mismatched shapes, ``tis_cap <= 0``, or ``kl_coef > 0`` without ``ref_logprobs``.
    """
    if not (logprobs.shape == old_logprobs.shape == behaviour_logprobs.shape == mask.shape):
        raise ValueError(
            "ppo_clip_tis_loss: shapes differ: logprobs "
            f"{tuple(logprobs.shape)}, old {tuple(old_logprobs.shape)}, behaviour "
            f"{tuple(behaviour_logprobs.shape)}, mask {tuple(mask.shape)}"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B]={tuple(logprobs.shape[:1])}, got {tuple(advantages.shape)}")
    if tis_cap <= 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs")
    mask = mask.to(logprobs.dtype)
    n_tok = mask.sum()
    normalizer = float(loss_normalizer) if loss_normalizer is not None else n_tok.clamp(min=1.0)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)

    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg1, pg2)

    with torch.no_grad():
        # log(pi_learner / pi_behaviour) on tokens sampled from the behaviour policy.
        log_w = (old_logprobs - behaviour_logprobs).clamp(-20.0, 20.0)
        raw_w = torch.exp(log_w)
        w = raw_w.clamp(max=tis_cap)
        mismatch_k3 = raw_w - 1.0 - log_w  # k3 estimate of KL(behaviour || learner)

    per_token = w * pg
    if kl_coef > 0:
        d = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1.0)
    loss = (per_token * mask).sum() / normalizer

    with torch.no_grad():
        denom = n_tok.clamp(min=1.0)

        def mmean(x: torch.Tensor) -> float:
            return float((x * mask).sum() / denom)

        metrics = {
            "learner/pg_clipfrac": mmean((pg2 > pg1).to(logprobs.dtype)),
            "off_policy/is_weight_mean": mmean(w),
            "off_policy/is_truncated_frac": mmean((raw_w > tis_cap).to(logprobs.dtype)),
            "off_policy/mismatch_kl": mmean(mismatch_k3),
            "learner/tokens": float(n_tok),
        }
    return loss, metrics
