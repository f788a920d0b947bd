"""The pure pieces of one learner training step, which `LearnerWorker.train_step` composes.

Per-sample advantages and weights of a batch, response logprobs of a micro-batch under a model,
pi_prox of a micro-batch after the first PPO minibatch, the no-grad pi_prox recompute over a pass
schedule, and the aggregation of per-micro-batch metrics. None of them touch DeepSpeed or Ray, so
unit tests call them with plain models and tensors.

Response logprobs take one model forward per micro-batch (under ZeRO-3 every forward gathers
parameters collectively, so every rank must run as many). Samples that share a prompt (a GRPO group)
share one encoding of it: one packed row per prompt, the prompt followed by all of its responses, with
a block attention mask and positions that restart after the prompt for each response, so every token
sees what it would see in its own padded row (Prefix Grouper, Liu et al. 2025, arXiv 2506.05433:
same outputs and gradients as the padded batch). The LM head runs only at the positions that predict
response tokens, in chunks, inside the head module's own call. What the model's forward does to the
head's logits (scaling, soft-capping) the scoring head does itself, and sliding-window layers get their
window in the block mask (`learner.model_support`, which also refuses at start what neither can reproduce).

The layouts themselves are in `learner.layout`.

Left out on purpose: backward passes, optimizer steps and the gradient-accumulation boundary
(`learner.worker`), how a batch is split over ranks (`learner.batching`), packing of samples that
share no prompt, and shared prefixes longer than the prompt (earlier turns of multi-turn episodes).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from learner.layout import (ForwardLayout, attention_pair_weight, padded_layout, shared_prefix_layout,
                            shared_prefix_pays)
from learner.metrics import Metrics, Reduce
from learner.model_support import Scoring, block_masks
from learner.model_support import scoring as model_scoring

if TYPE_CHECKING:
    from learner.advantages import AdvantageConfigBase


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


def step_advantages(batch: list[list], version: int, estimator: AdvantageConfigBase | str, staleness_decay: float
                    ) -> StepAdvantages:
    """Group advantages of ``batch`` (lists of `buffer.Sample`, one per group; sizes may differ) by
    ``estimator`` (``learner.advantage``, or a registered name for its defaults), scaled per sample by
    ``staleness_decay ** staleness`` at learner ``version``. Samples whose reward function failed (status
    ``failed``) stay out of the group statistics and get advantage 0.

    Raises:
        ValueError: the estimator is ``spo`` and a sample has no baseline, or what
            `learner.advantages.batch_advantages` raises.
    """
    from learner.advantages import batch_advantages
    from learner.off_policy import staleness_weights

    samples = [s for g in batch for s in g]
    baselines = None
    if (estimator if isinstance(estimator, str) else estimator.type) == "spo":
        if any(s.baseline is None for s in samples):
            raise ValueError("learner.advantage = 'spo' needs per-prompt baselines: set buffer.value_tracker = true")
        baselines = [[s.baseline for s in g] for g in batch]
    valid = [[s.status != "failed" for s in g] for g in batch]
    adv, metrics = batch_advantages(estimator, [[s.reward for s in g] for g in batch], baselines, valid)
    weights = staleness_weights(torch.tensor([s.staleness(version) for s in samples]), staleness_decay)
    return StepAdvantages((torch.tensor(adv) * weights).tolist(), weights, sum(abs(a) > 1e-6 for a in adv), metrics)


SHARED_PREFIX_ATTENTION = ("sdpa", "eager")
"""Attention implementations (transformers' ``attn_implementation``) that take the custom 4D block mask of
the shared-prefix layout. Flash-attention kernels take only a causal mask and sequence boundaries, so a
response could not see its prompt without seeing its siblings too: refused."""


def token_logprobs(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, targets: torch.Tensor,
                   temperature: float, chunk_tokens: int, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logprobs of ``targets`` and the policy's entropy at ``temperature``, the LM head applied in chunks.

    Args:
        head: the LM head, ``[n, H] -> [n, V]`` logits.
        hidden: ``[N, H]`` final hidden states of the positions that predict the scored tokens.
        targets: ``[N]`` token ids.
        chunk_tokens: positions per chunk. With more than one chunk and grad enabled, each chunk is
            recomputed in backward (activation checkpointing), so at most one chunk's ``[chunk, V]``
            logits are alive at a time; the ops are those of the unchunked computation, so the
            gradients are the same.
        transform: what the model's forward does to the head's logits (`learner.model_support.logit_transform`:
            scaling, soft-capping), applied before the temperature; None: nothing.

    Returns:
        ``(logprobs [N] float32, entropy [N] float32)``; the entropy (nats, of the tempered softmax) is detached.
    """
    from torch.utils.checkpoint import checkpoint

    def score(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(h).float()
        if transform is not None:
            logits = transform(logits)
        lp = torch.log_softmax(logits / temperature, dim=-1)
        with torch.no_grad():
            entropy = -(lp.exp() * lp).sum(-1)
        return lp.gather(1, t[:, None]).squeeze(1), entropy

    if len(targets) <= chunk_tokens:
        return score(hidden, targets)
    parts = [checkpoint(score, hidden[a: a + chunk_tokens], targets[a: a + chunk_tokens], use_reentrant=False)
             if torch.is_grad_enabled() else score(hidden[a: a + chunk_tokens], targets[a: a + chunk_tokens])
             for a in range(0, len(targets), chunk_tokens)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@contextmanager
def _scoring_head(head: torch.nn.Module, layout: ForwardLayout, temperature: float, chunk_tokens: int,
                  transform: Callable[[torch.Tensor], torch.Tensor] | None, scored: list[torch.Tensor],
                  entropy: list[torch.Tensor]):
    """Within the block, ``head``'s forward takes the model's ``[rows, L, H]`` hidden states and returns
    the ``[N]`` logprobs of ``layout``'s scored tokens (of the ``transform``-ed logits), which are also
    appended to ``scored`` (their entropy to ``entropy``).

    The scoring runs inside the LM head module's own call, so whatever the model wrapper hooks into that
    call (DeepSpeed ZeRO-3 gathers the head's weights for forward and again for backward) covers it, and
    the model forward stays one call per micro-batch whatever the number of chunks. ``scored`` holds the
    head's output as the module call returns it (after the wrapper's own forward hooks, which ZeRO-3 uses to
    gather the head's weights in backward), not the model's output: a model that transforms its logits after
    the head (`learner.model_support`) would transform the logprobs again.
    """
    inner, own = head.forward, head.__dict__.get("forward")  # an instance forward (accelerate hooks) is kept

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        dev = hidden.device
        lp, ent = token_logprobs(inner, hidden[layout.src_row.to(dev), layout.src_pos.to(dev)],
                                 layout.targets.to(dev), temperature, chunk_tokens, transform)
        entropy.append(ent)
        return lp

    head.forward = forward
    hook = head.register_forward_hook(lambda module, args, out: scored.append(out))
    try:
        yield
    finally:
        hook.remove()
        if own is None:
            del head.forward
        else:
            head.forward = own


def response_logprobs(model, samples: list, device, temperature: float, shared_prefix: bool = True,
                      chunk_tokens: int = 1024, with_entropy: bool = False, pack_tokens: int = 0,
                      by_cost: bool = False, scoring: Scoring | None = None):
    """Per-token logprobs of each sample's response tokens at ``temperature`` and the loss mask.

    One model forward per call, whatever the samples (ZeRO-3 gathers parameters in every forward, so
    every rank must run as many). ``shared_prefix``: samples with identical ``prompt_ids`` share one
    encoding of the prompt, and prompt blocks share rows of up to ``pack_tokens`` tokens
    (`shared_prefix_layout`; needs an attention implementation in
    `SHARED_PREFIX_ATTENTION`), else one right-padded row per sample (`padded_layout`); with ``by_cost`` as
    well, the padded layout whenever `learner.layout.shared_prefix_pays` estimates it cheaper for these
    samples (both give the same logprobs and gradients). Either way the
    LM head runs only at the positions that predict response tokens, in chunks of ``chunk_tokens``
    (`token_logprobs`), never on the prompt.

    Args:
        model: a causal LM (transformers, optionally PEFT-wrapped) or a DeepSpeed engine around one.
        samples: `buffer.Sample`s of one micro-batch, ``B`` of them.
        scoring: what `learner.model_support.scoring` decided for this model at start (a learner rank passes
            the result of its setup-time check); None: check the model's config now, on this call.

    Returns:
        ``(logprobs [B, R_max], loss_mask [B, R_max])`` in the samples' order, zero beyond each response
        (``R_max >= 1``, so a batch of empty responses still has one column); with ``with_entropy`` also
        the ``[B, R_max]`` entropy of the policy at each response position (detached). Grad follows the
        caller's mode.

    Raises:
        ValueError: ``shared_prefix`` with an attention implementation not in `SHARED_PREFIX_ATTENTION`, a
            model feature the scoring cannot reproduce (`learner.model_support.check`, when ``scoring`` is
            None), or an empty prompt.
    """
    core = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
    config = core.config
    if scoring is None:
        scoring = model_scoring(config, shared_prefix, config._attn_implementation)
    layout, shared_prefix = _choose_layout(samples, config, shared_prefix, by_cost, pack_tokens)
    attn = _attention_mask(core, layout, shared_prefix, scoring, device)
    entropy: list[torch.Tensor] = []
    scored: list[torch.Tensor] = []
    # MoE: no router logits, so no load-balancing loss (not part of the RL loss; it would also misread a 4D mask)
    moe = {"output_router_logits": False} if hasattr(config, "output_router_logits") else {}
    with _scoring_head(core.get_output_embeddings(), layout, temperature, chunk_tokens, scoring.transform,
                       scored, entropy):
        model(input_ids=layout.input_ids.to(device), attention_mask=attn, position_ids=layout.position_ids.to(device),
              use_cache=False, **moe)
    # scored[0], not the model's output: the model may transform the head's output again
    B, R = len(samples), max(max(len(s.response_ids) for s in samples), 1)
    out = _per_sample(scored[0], layout, B, R, device)
    mask = loss_masks(samples, R, device)
    return (out, mask, _per_sample(entropy[0], layout, B, R, device)) if with_entropy else (out, mask)


def _choose_layout(samples: list, config, shared_prefix: bool, by_cost: bool, pack_tokens: int
                   ) -> tuple[ForwardLayout, bool]:
    """The micro-batch's layout and whether it is the shared-prefix one: shared prefix when asked for (and,
    with ``by_cost``, when `shared_prefix_pays` for these samples), else one padded row per sample."""
    if shared_prefix and by_cost:
        shared_prefix = shared_prefix_pays(samples, attention_pair_weight(config), pack_tokens)
    return (shared_prefix_layout(samples, pack_tokens) if shared_prefix else padded_layout(samples)), shared_prefix


def _attention_mask(core, layout: ForwardLayout, shared_prefix: bool, scoring: Scoring, device):
    """The ``attention_mask`` argument of the model's forward: the layout's ``[rows, L]`` padding mask, or with
    ``shared_prefix`` its block mask as ``[rows, 1, L, L]`` (bool for sdpa, additive in the embeddings' dtype for
    eager), one per layer type when sliding and full layers mix (`learner.model_support.block_masks`).

    Raises:
        ValueError: ``shared_prefix`` with an attention implementation not in `SHARED_PREFIX_ATTENTION`.
    """
    attn = layout.attention_mask.to(device)
    if not shared_prefix:
        return attn
    impl = core.config._attn_implementation
    if impl not in SHARED_PREFIX_ATTENTION:
        raise ValueError(f"learner.shared_prefix needs an attention implementation that takes a 4D mask "
                         f"{SHARED_PREFIX_ATTENTION}, the model uses {impl!r}")
    dtype = core.get_input_embeddings().weight.dtype

    def four_d(m: torch.Tensor) -> torch.Tensor:
        m = m[:, None]  # [rows, 1, L, L], one mask for every head
        if impl == "eager":  # eager adds the mask to the scores
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
        return m

    masks = block_masks(attn, layout.position_ids.to(device), scoring.window, scoring.mixed)  # windows per layer
    return {k: four_d(m) for k, m in masks.items()} if isinstance(masks, dict) else four_d(masks)


def _per_sample(values: torch.Tensor, layout: ForwardLayout, B: int, R: int, device) -> torch.Tensor:
    """``[N]`` values of the layout's scored tokens as ``[B, R]`` rows, one per sample, zero elsewhere."""
    out = torch.zeros(B, R, device=device)
    out[layout.out_row.to(device), layout.out_col.to(device)] = values
    return out


def loss_masks(samples: list, R: int, device) -> torch.Tensor:
    """``[B, R]`` float loss masks of ``samples`` (each its ``loss_mask``, zero-padded to ``R`` columns)."""
    mask = torch.zeros(len(samples), R, device=device)
    for i, s in enumerate(samples):
        mask[i, : len(s.loss_mask)] = torch.tensor(s.loss_mask, dtype=torch.float32, device=device)
    return mask


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
            padding pass, run on the first scheduled sample (or the batch's first) and discarded, so
            that every rank runs the same number of forward passes (ZeRO-3 gathers parameters in each one).

    Returns:
        sample index -> ``[R]`` logprobs of its response tokens.
    """
    filler = next(([samples[i]] for idx in schedule for i in idx), samples[:1])  # a rank with nothing to run
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


def batch_metrics(samples: list, prep: StepAdvantages, with_rollout: bool) -> Metrics:
    """Metrics of the batch itself: sample count, mean staleness weight, the estimator's metrics and,
    ``with_rollout`` (rank 0), ``rollout/*`` means over samples (lengths in tokens) and
    ``curation/effective_samples`` (samples with a non-zero advantage). Every rank sees the whole batch,
    so each is `Reduce.FIRST` across ranks (the ``with_rollout`` ones only rank 0 reports)."""
    n = len(samples)
    out = Metrics().put(Reduce.FIRST, {"off_policy/sample_weight_mean": float(prep.weights.mean()), **prep.metrics,
                                       "learner/samples": float(n)})
    if with_rollout:
        out.put(Reduce.FIRST, {"curation/effective_samples": float(prep.effective),
                    "rollout/reward_mean": sum(s.reward for s in samples) / n,
                    "rollout/correct_frac": sum(s.correct for s in samples) / n,
                    "rollout/response_len_mean": sum(len(s.response_ids) for s in samples) / n,
                    "rollout/truncated_frac": sum(s.status == "truncated" for s in samples) / n})
    return out
