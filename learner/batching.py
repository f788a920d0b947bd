"""How a batch is split over learner ranks, PPO minibatches and micro-batches.

- **Ranks get whole groups, balanced by tokens.** The samples of a group share their prompt, which the
  shared-prefix forward encodes once per micro-batch; splitting a group over ranks would encode it once
  per rank. Groups go to ranks by longest-processing-time-first on their forward tokens (the prompt
  once plus every response), so ranks finish their passes at about the same time.
- **Micro-batches by count or by tokens.** ``micro_batch_size`` samples per pass, or, with a token
  budget (``learner.max_tokens_per_microbatch``), as many samples as fit in that many forward tokens
  (the layout's tokens: shared prefix counts each prompt once per micro-batch; padded rows count every
  row at the longest length).
- **Every rank runs the same number of passes.** ZeRO reduces gradients collectively, so a rank that
  skipped a pass would leave its peers waiting: a rank with fewer micro-batches in a minibatch runs
  padding passes (an empty list: the caller does a zero-weighted pass), and the caller marks the
  optimizer-step boundary itself. The no-grad pi_prox recompute before training follows the same rule
  (`prox_schedule`): under ZeRO-3 every forward pass all-gathers the parameters.

- **Samples with a zero gradient are left out** (`restrict_plan`): with no KL term, a sample whose
  advantage is 0 (every sample of a GRPO group with all-equal rewards) adds exactly 0 to the gradient
  under every policy loss, so the learner need not run it; the rest keep their rank and minibatch.

The plan is a pure function of the batch, computed identically on every rank, so ranks agree on it
without communicating.
"""

from __future__ import annotations

from typing import NamedTuple


class BatchShape(NamedTuple):
    """What planning needs of a batch: per sample (``[N]`` lists, in batch order) its group and lengths.

    Samples of one group share their prompt and are contiguous in the batch.
    """

    group: list[int]
    prompt_tokens: list[int]
    response_tokens: list[int]

    @classmethod
    def of(cls, batch: list[list]) -> BatchShape:
        """From a batch of sample groups (lists of `buffer.Sample`)."""
        group, prompt, response = [], [], []
        for g, samples in enumerate(batch):
            for s in samples:
                group.append(g)
                prompt.append(len(s.prompt_ids))
                response.append(len(s.response_ids))
        return cls(group, prompt, response)

    @classmethod
    def singletons(cls, n: int) -> BatchShape:
        """``n`` one-sample groups of one token each (plans that depend only on counts)."""
        return cls(list(range(n)), [1] * n, [0] * n)


def forward_tokens(shape: BatchShape, idx: list[int], shared_prefix: bool) -> int:
    """Tokens the forward pass of micro-batch ``idx`` processes: with ``shared_prefix`` each group's
    prompt once plus every response; else one row per sample, each padded to the longest."""
    if not idx:
        return 0
    if not shared_prefix:
        return len(idx) * max(shape.prompt_tokens[i] + shape.response_tokens[i] for i in idx)
    prompts = {shape.group[i]: shape.prompt_tokens[i] for i in idx}
    return sum(prompts.values()) + sum(shape.response_tokens[i] for i in idx)


def assign_ranks(shape: BatchShape, world_size: int) -> list[list[int]]:
    """Sample indices per rank: whole groups, longest-processing-time first on each group's tokens
    (prompt once plus responses), ties to the lower rank; each rank's samples in batch order."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(shape.group):
        members.setdefault(g, []).append(i)
    cost = {g: shape.prompt_tokens[idx[0]] + sum(shape.response_tokens[i] for i in idx) for g, idx in members.items()}
    load = [0] * world_size
    owner = {}
    for g in sorted(members, key=lambda g: (-cost[g], g)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[g], load[r] = r, load[r] + cost[g]
    return [[i for i, g in enumerate(shape.group) if owner[g] == r] for r in range(world_size)]


def _micro_batches(shape: BatchShape, chunk: list[int], micro_batch_size: int, max_tokens: int,
                   shared_prefix: bool) -> list[list[int]]:
    if max_tokens <= 0:
        return [chunk[i: i + micro_batch_size] for i in range(0, len(chunk), micro_batch_size)]
    out: list[list[int]] = []
    for i in chunk:
        alone = shape.prompt_tokens[i] + shape.response_tokens[i]
        if alone > max_tokens:
            raise ValueError(f"a sample of {alone} tokens ({shape.prompt_tokens[i]} prompt + "
                             f"{shape.response_tokens[i]} response) exceeds learner.max_tokens_per_microbatch = "
                             f"{max_tokens}; raise it to at least {alone} or lower rollout.max_tokens")
        if out and forward_tokens(shape, out[-1] + [i], shared_prefix) <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def plan_microbatches(shape: BatchShape, world_size: int, minibatches: int, micro_batch_size: int,
                      max_tokens_per_microbatch: int = 0, shared_prefix: bool = True
                      ) -> list[list[list[list[int]]]]:
    """Sample indices per ``[rank][minibatch][micro-batch]``.

    Rank ``r`` owns the groups `assign_ranks` gives it; its share is cut into ``minibatches``
    contiguous, near-equal chunks (by samples), each into micro-batches: ``micro_batch_size`` samples,
    or with ``max_tokens_per_microbatch > 0`` as many consecutive samples as fit in that many
    `forward_tokens`. Within a minibatch every rank gets the same number of micro-batches; the missing
    ones are empty lists (padding).

    Raises:
        ValueError: no rank has ``minibatches`` samples (some optimizer step would have no data); a
            sample alone longer than ``max_tokens_per_microbatch`` (naming its length and the budget);
            a non-positive size.
    """
    if min(world_size, minibatches, micro_batch_size) < 1:
        raise ValueError(f"world_size, minibatches, micro_batch_size must be >= 1, got "
                         f"{world_size}, {minibatches}, {micro_batch_size}")
    shares = assign_ranks(shape, world_size)
    if max(len(s) for s in shares) < minibatches:
        raise ValueError(f"a batch of {len(shape.group)} samples in {len(set(shape.group))} groups cannot feed "
                         f"{minibatches} minibatches on {world_size} learner ranks: the largest rank share is "
                         f"{max(len(s) for s in shares)} samples; lower learner.ppo_minibatches")
    plan = [[[] for _ in range(minibatches)] for _ in range(world_size)]
    for r, share in enumerate(shares):
        q, extra = divmod(len(share), minibatches)
        bounds = [k * q + min(k, extra) for k in range(minibatches + 1)]
        for k in range(minibatches):
            plan[r][k] = _micro_batches(shape, share[bounds[k]: bounds[k + 1]], micro_batch_size,
                                        max_tokens_per_microbatch, shared_prefix)
    for k in range(minibatches):
        passes = max(len(plan[r][k]) for r in range(world_size))
        for r in range(world_size):
            plan[r][k] += [[] for _ in range(passes - len(plan[r][k]))]
    return plan


def restrict_plan(plan: list[list[list[list[int]]]], shape: BatchShape, keep: list[bool], micro_batch_size: int,
                  max_tokens_per_microbatch: int = 0, shared_prefix: bool = True) -> list[list[list[list[int]]]]:
    """``plan`` (a `plan_microbatches` plan) with only the samples where ``keep[i]``, for passes that skip
    samples whose gradient is known to be zero.

    Every kept sample stays on its rank and in its PPO minibatch (so each optimizer step sees the
    same samples as in ``plan``); a rank's kept samples of a minibatch are cut into micro-batches again
    (``micro_batch_size`` samples or ``max_tokens_per_microbatch`` forward tokens), and every rank
    gets the same number of passes per minibatch, at least one: a minibatch with no kept sample on any
    rank is one padding pass (an empty list) per rank, so its optimizer step still runs.

    Raises:
        ValueError: ``keep`` is not one flag per sample of ``shape``.
    """
    if len(keep) != len(shape.group):
        raise ValueError(f"restrict_plan: {len(keep)} keep flags for a batch of {len(shape.group)} samples")
    out = [[_micro_batches(shape, [i for micro in mb for i in micro if keep[i]], micro_batch_size,
                           max_tokens_per_microbatch, shared_prefix) for mb in rank_plan] for rank_plan in plan]
    for k in range(len(plan[0]) if plan else 0):
        passes = max(1, max(len(out[r][k]) for r in range(len(out))))
        for r in range(len(out)):
            out[r][k] += [[] for _ in range(passes - len(out[r][k]))]
    return out


def prox_schedule(plan: list[list[list[list[int]]]], rank: int) -> list[list[int]]:
    """Sample indices per no-grad pi_prox forward pass of ``rank``, given a `plan_microbatches` plan.

    The rank's micro-batches in plan order (padding left out), then empty lists (padding passes) up to
    the largest pass count of any rank. The plan is the same on every rank, so every rank arrives at the
    same number of passes without communicating.
    """
    def own(r: int) -> list[list[int]]:
        return [micro for mb in plan[r] for micro in mb if micro]

    passes = max(len(own(r)) for r in range(len(plan)))
    mine = own(rank)
    return mine + [[] for _ in range(passes - len(mine))]

