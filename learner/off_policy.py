"""Off-policy helpers the learner applies before a policy loss: proximal logprobs, sample weights,
loss normalisers. Pure functions on tensors.

Left out on purpose: the losses themselves (`learner.losses`) and staleness accounting in the
buffer (`buffer.replay`).
"""

from __future__ import annotations

import torch


def loglinear_prox_logprobs(behaviour_logprobs: torch.Tensor, logprobs: torch.Tensor, token_versions: torch.Tensor,
                            prox_version: float, current_version: float) -> torch.Tensor:
    """Approximate log pi_prox by interpolating in log space between behaviour and current policy.

    ``log pi_prox ~= log pi_behav + alpha * (log pi_theta - log pi_behav)`` with
    ``alpha = (v_prox - v_behav) / (v_theta - v_behav)`` per token, clamped to ``[0, 1]``
    (AReaL, ``actor.prox_logp_method = "loglinear"``; Fu et al. 2025). The learner calls it for
    the 2nd and later PPO minibatches of a batch, where pi_theta has already moved by a fraction of
    a version: ``v_theta = v_prox + k / num_minibatches``. AReaL uses ``v_theta = v_prox + 1``; the
    fractional version is this project's refinement and reduces to AReaL's at the last minibatch
    boundary.

    Args:
        behaviour_logprobs, logprobs: ``[B, T]`` log pi_behav and log pi_theta (detached) of the
            sampled tokens.
        token_versions: ``[B, T]`` policy version that generated each token.
        prox_version: version of the proximal policy (the learner at the start of the batch).
        current_version: ``v_theta >= prox_version``.

    Returns:
        ``[B, T]`` approximate log pi_prox (no grad).

    Raises:
        ValueError: ``current_version < prox_version`` or mismatched shapes.
    """
    if current_version < prox_version:
        raise ValueError(f"current_version {current_version} < prox_version {prox_version}")
    if behaviour_logprobs.shape != logprobs.shape or token_versions.shape != logprobs.shape:
        raise ValueError(f"shapes differ: {tuple(behaviour_logprobs.shape)}, {tuple(logprobs.shape)}, "
                         f"{tuple(token_versions.shape)}")
    v_b = token_versions.to(logprobs.dtype)
    span = current_version - v_b
    alpha = torch.where(span > 0, (prox_version - v_b) / span.clamp(min=1e-9), torch.ones_like(span)).clamp(0.0, 1.0)
    return (behaviour_logprobs + alpha * (logprobs - behaviour_logprobs)).detach()


def staleness_weights(staleness: torch.Tensor, decay: float) -> torch.Tensor:
    """Per-sample loss weights ``decay ** staleness`` (``[B]`` -> ``[B]``), down-weighting older samples.

    Every loss in `learner.losses` is positively homogeneous in the advantage, so the learner
    applies the weight by scaling the sample's advantage. ``decay = 1`` keeps all weights at 1.

    Raises:
        ValueError: ``decay`` outside ``(0, 1]`` or a negative staleness.
    """
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"staleness decay must be in (0, 1], got {decay}")
    if (staleness < 0).any():
        raise ValueError(f"staleness must be >= 0, got min {int(staleness.min())}")
    return torch.full_like(staleness, decay, dtype=torch.float32) ** staleness.to(torch.float32)


def loss_normalizer(agg: str, num_tokens: float, num_samples: int, max_tokens: int) -> float:
    """The denominator of a minibatch loss ``sum(mask * per_token_loss) / normalizer``.

    ``token_mean``: the minibatch's trained-token count (DAPO's token-level mean). ``constant``:
    ``num_samples * max_tokens``, a constant that does not depend on response lengths, so long
    and short responses get the same per-token weight (Dr. GRPO, Liu et al. 2025,
    "Understanding R1-Zero-Like Training").

    Raises:
        ValueError: unknown ``agg``.
    """
    if agg == "token_mean":
        return max(float(num_tokens), 1.0)
    if agg == "constant":
        return float(max(num_samples, 1) * max_tokens)
    raise ValueError(f"unknown loss aggregation {agg!r} (known: 'token_mean', 'constant')")
