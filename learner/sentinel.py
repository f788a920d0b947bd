"""The learner's half of the run-time sentinel: which sampled tokens to score, and the gap to the engine.

The orchestrator (`orchestrator.sentinel`) hands a learner rank a few groups a rollout worker has just
sampled with the learner's own policy version; the rank scores them at the rollout temperature
(`LearnerWorker.probe`) and `logprob_gap` compares its logprobs with the engine's behaviour logprobs on
the tokens of that version. Both sides hold the same weights then, so any gap beyond floating-point
noise is a disagreement between the learner and the engine: a model feature one side does not
implement, a kernel bug, or weights that arrived wrong.

Left out on purpose: the bound and the decision to stop (`orchestrator.sentinel`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from buffer import Sample


def probe_samples(groups: list[list[Sample]], version: int, num_samples: int) -> list[Sample]:
    """Up to ``num_samples`` samples of ``groups`` with at least one trained token (loss mask 1) sampled at
    policy ``version``, taken round-robin over the groups (the first sample of each, then the second, ...);
    failed samples are left out."""
    usable = [[s for s in g if s.status != "failed" and
               any(m and v == version for m, v in zip(s.loss_mask, s.policy_versions))] for g in groups]
    out: list[Sample] = []
    for i in range(max((len(g) for g in usable), default=0)):
        out += [g[i] for g in usable if i < len(g)]
    return out[:num_samples]


def logprob_gap(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """How far the learner's logprobs are from the engine's on the same sampled tokens.

    Args:
        logprobs: ``[B, T]`` learner log pi(token), nats, at the rollout temperature.
        behaviour_logprobs: ``[B, T]`` the engine's logprobs of the same tokens (what it sampled with).
        mask: ``[B, T]`` 1 for the tokens to compare (trained tokens sampled at the learner's version).

    Returns:
        ``tokens`` (compared), ``mean_abs_logprob_diff`` (mean over them of ``|learner - engine|``,
        nats/token), ``max_abs_logprob_diff`` (nats) and ``mismatch_kl`` (the k3 estimate of
        KL(engine || learner) per token, ``r - 1 - log r`` with ``r = pi_learner / pi_engine``: the
        estimator of ``off_policy/mismatch_kl``, unbiased for tokens sampled by the engine). All 0 when
        no token is compared.

    Raises:
        ValueError: the three tensors differ in shape.
    """
    import torch

    from learner.losses import k3_kl_per_token

    if not logprobs.shape == behaviour_logprobs.shape == mask.shape:
        raise ValueError(f"logprob_gap: shapes differ: logprobs {tuple(logprobs.shape)}, behaviour "
                         f"{tuple(behaviour_logprobs.shape)}, mask {tuple(mask.shape)}")
    m = mask.to(torch.float64)
    n = float(m.sum())
    if n == 0:
        return {"tokens": 0.0, "mean_abs_logprob_diff": 0.0, "max_abs_logprob_diff": 0.0, "mismatch_kl": 0.0}
    log_r = (logprobs.to(torch.float64) - behaviour_logprobs.to(torch.float64)) * m
    return {"tokens": n, "mean_abs_logprob_diff": float(log_r.abs().sum() / n),
            "max_abs_logprob_diff": float(log_r.abs().max()),
            "mismatch_kl": float((k3_kl_per_token(log_r) * m).sum() / n)}
