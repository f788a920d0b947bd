"""The pure pieces of one learner training step, which `LearnerWorker.train_step` composes.

Per-sample advantages and weights of a batch, response logprobs of a micro-batch under a model,
pi_prox of a micro-batch after the first PPO minibatch, the no-grad pi_prox recompute over a pass
schedule, and the aggregation of per-micro-batch metrics. None of them touch DeepSpeed or Ray, so
unit tests call them with plain models and tensors.

Left out on purpose: backward passes, optimizer steps and the gradient-accumulation boundary
(`learner.worker`), and how a batch is split over ranks (`learner.batching`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class StepAdvantages:
    """What a training step weights each sample's loss by.

    Attributes:
        advantages: ``[N]`` per-sample advantage times staleness weight, samples in batch order.
        weights: ``[N]`` staleness weights ``staleness_decay ** staleness``.
        effective: samples whose (unweighted) advantage is non-zero.
        metrics: the estimator's metrics (``learner/zero_variance_group_frac``).
    """

    advantages: list[float]
    weights: torch.Tensor
    effective: int
    metrics: dict[str, float]


def step_advantages(batch: list[list], version: int, estimator: str, staleness_decay: float) -> StepAdvantages:
    """Group advantages of ``batch`` (lists of `buffer.Sample`, one per group; sizes may differ),
    scaled per sample by ``staleness_decay ** staleness`` at learner ``version``. Samples whose reward
    function failed (status ``failed``) stay out of the group statistics and get advantage 0.

    Raises:
        ValueError: ``estimator == "spo"`` and a sample has no baseline, or what
            `learner.advantages.batch_advantages` raises.
    """
    from learner.advantages import batch_advantages
    from learner.off_policy import staleness_weights

    samples = [s for g in batch for s in g]
    baselines = None
    if estimator == "spo":
        if any(s.baseline is None for s in samples):
            raise ValueError("learner.advantage = 'spo' needs per-prompt baselines: set buffer.value_tracker = true")
        baselines = [[s.baseline for s in g] for g in batch]
    valid = [[s.status != "failed" for s in g] for g in batch]
    adv, metrics = batch_advantages(estimator, [[s.reward for s in g] for g in batch], baselines, valid)
    weights = staleness_weights(torch.tensor([s.staleness(version) for s in samples]), staleness_decay)
    return StepAdvantages((torch.tensor(adv) * weights).tolist(), weights, sum(abs(a) > 1e-6 for a in adv), metrics)


def response_logprobs(model, samples: list, device, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token logprobs of each sample's response tokens at ``temperature`` and the loss mask.

    Prompt and response are concatenated and right-padded to the longest sample (``[B, T]``); one
    forward pass. The LM head runs only from the shortest prompt's last position on (transformers'
    ``logits_to_keep``): positions before it are never scored, and full-vocabulary logits there cost
    as much as the rest of a small model's forward. Returns ``(logprobs [B, R_max], loss_mask
    [B, R_max])``, zero beyond each response (``R_max >= 1``, so a batch of empty responses still has
    one column). Grad follows the caller's mode.
    """
    lens = [s.num_tokens for s in samples]
    T, R = max(lens), max(max(len(s.response_ids) for s in samples), 1)
    ids = torch.zeros(len(samples), T, dtype=torch.long)
    attn = torch.zeros(len(samples), T, dtype=torch.long)
    for i, s in enumerate(samples):
        seq = s.prompt_ids + s.response_ids
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
    first = max(min(len(s.prompt_ids) for s in samples) - 1, 0)  # first position whose logits are scored
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device), logits_to_keep=T - first).logits
    logits = logits.float() / temperature  # [B, T - first, V]: position t is column t - first
    out = torch.zeros(len(samples), R, device=device)
    mask = torch.zeros(len(samples), R, device=device)
    for i, s in enumerate(samples):
        P, r = len(s.prompt_ids), len(s.response_ids)
        if r == 0:
            continue
        lp = torch.log_softmax(logits[i, P - 1 - first : P - 1 - first + r], dim=-1)
        tgt = torch.tensor(s.response_ids, device=device)
        out[i, :r] = lp.gather(1, tgt[:, None]).squeeze(1)
        mask[i, :r] = torch.tensor(s.loss_mask, dtype=torch.float32, device=device)
    return out, mask


def padded_field(samples: list, attr: str, like: torch.Tensor, pad: float) -> torch.Tensor:
    """``[B, R_max]`` tensor (dtype and shape of ``like``) of a per-token Sample field, right-padded with ``pad``."""
    out = torch.full_like(like, pad)
    for i, s in enumerate(samples):
        vals = getattr(s, attr)
        out[i, : len(vals)] = torch.tensor(vals, dtype=out.dtype)
    return out


def recompute_prox(forward: Callable[[list], torch.Tensor], samples: list, schedule: list[list[int]]
                   ) -> dict[int, torch.Tensor]:
    """log pi_prox of the scheduled samples by no-grad forward passes, one per schedule entry.

    Args:
        forward: micro-batch of Samples -> ``[B, R_max]`` response logprobs (`response_logprobs`).
        samples: the whole batch.
        schedule: sample indices per pass (`learner.batching.prox_schedule`); an empty entry is a
            padding pass, run on the first scheduled sample and discarded, so that every rank runs
            the same number of forward passes (ZeRO-3 gathers parameters in each one).

    Returns:
        sample index -> ``[R]`` logprobs of its response tokens.
    """
    filler = next(([samples[i]] for idx in schedule for i in idx), None)
    out = {}
    with torch.no_grad():
        for idx in schedule:
            mb = [samples[i] for i in idx] or filler
            lp = forward(mb)
            out.update((i, lp[j, : len(samples[i].response_ids)].clone()) for j, i in enumerate(idx))
    return out


def later_minibatch_prox(logprobs: torch.Tensor, behaviour: torch.Tensor, versions: torch.Tensor,
                         mask: torch.Tensor, version: int, progress: float, exact: list[torch.Tensor] | None
                         ) -> tuple[torch.Tensor, dict[str, float]]:
    """log pi_prox of a micro-batch in the 2nd or later PPO minibatch, when pi_theta has moved.

    Args:
        logprobs, behaviour, versions, mask: ``[B, R]`` log pi_theta (detached), log pi_behav, the
            policy version of each token, the loss mask.
        version: policy version at the start of the batch (the proximal policy).
        progress: optimizer steps taken so far in this batch over ``ppo_minibatches`` (``k / M``).
        exact: the recomputed ``[R_i]`` pi_prox of each row (`recompute_prox`), or None to use
            AReaL's log-linear approximation.

    Returns:
        ``(prox [B, R], metrics)``: ``learner/intra_batch_drift`` (mean ``|log pi_theta - log pi_prox|``
        per trained token, nats) and, with ``exact``, ``off_policy/prox_loglinear_abs_err`` (how far
        the approximation is from the recomputed value, nats per token).
    """
    from learner.off_policy import loglinear_prox_logprobs

    approx = loglinear_prox_logprobs(behaviour, logprobs, versions, version, version + progress)
    prox, metrics = approx, {}
    if exact is not None:
        prox = torch.zeros_like(logprobs)
        for i, p in enumerate(exact):
            prox[i, : len(p)] = p
        n = mask.sum().clamp(min=1.0)
        metrics["off_policy/prox_loglinear_abs_err"] = float(((approx - prox).abs() * mask).sum() / n)
    metrics["learner/intra_batch_drift"] = float(((logprobs - prox).abs() * mask).sum() / mask.sum().clamp(min=1.0))
    return prox, metrics


class TokenWeightedMeans:
    """Running token-weighted means of micro-batch metrics; each key is averaged over the
    micro-batches that report it (some keys appear only after the first minibatch)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.tokens: dict[str, float] = {}
        self.total_tokens = 0.0

    def add(self, metrics: dict[str, float], tokens: float) -> None:
        """Add one micro-batch's metrics, weighted by its trained-token count."""
        self.total_tokens += tokens
        for key, v in metrics.items():
            self.totals[key] = self.totals.get(key, 0.0) + v * tokens
            self.tokens[key] = self.tokens.get(key, 0.0) + tokens

    def means(self) -> dict[str, float]:
        """``key -> sum(value * tokens) / sum(tokens)`` (a key with 0 tokens divides by 1)."""
        return {k: v / max(self.tokens[k], 1.0) for k, v in self.totals.items()}


def batch_metrics(samples: list, prep: StepAdvantages, with_rollout: bool) -> dict[str, float]:
    """Metrics of the batch itself: sample count, mean staleness weight, the estimator's metrics and,
    ``with_rollout`` (rank 0), ``rollout/*`` means over samples (lengths in tokens) and
    ``curation/effective_samples`` (samples with a non-zero advantage)."""
    n = len(samples)
    out = {"off_policy/sample_weight_mean": float(prep.weights.mean()), **prep.metrics, "learner/samples": float(n)}
    if with_rollout:
        out.update({"curation/effective_samples": float(prep.effective),
                    "rollout/reward_mean": sum(s.reward for s in samples) / n,
                    "rollout/correct_frac": sum(s.correct for s in samples) / n,
                    "rollout/response_len_mean": sum(len(s.response_ids) for s in samples) / n,
                    "rollout/truncated_frac": sum(s.status == "truncated" for s in samples) / n})
    return out
