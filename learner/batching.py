"""How a batch of any size is split over learner ranks, PPO minibatches and micro-batches.

Batches vary in size (Knapsack-style rollout budgets give groups of different sizes), but every rank
must run the same number of forward/backward passes per optimizer step: ZeRO reduces gradients
collectively, so a rank that skipped a pass would leave its peers waiting. Ranks with fewer samples
in a minibatch therefore run padding passes (an empty micro-batch: the caller does a zero-weighted
pass), and the caller marks the optimizer-step boundary itself. The no-grad pi_prox recompute before
training follows the same rule (`prox_schedule`): under ZeRO-3 every forward pass all-gathers the
parameters, so every rank runs the same number of them.
"""

from __future__ import annotations

import math


def plan_microbatches(num_samples: int, world_size: int, minibatches: int, micro_batch_size: int
                      ) -> list[list[list[list[int]]]]:
    """Sample indices per ``[rank][minibatch][micro-batch]``.

    Rank ``r`` owns ``samples[r::world_size]``; its share is cut into ``minibatches`` contiguous,
    near-equal chunks, each into micro-batches of at most ``micro_batch_size``. Within a minibatch
    every rank gets the same number of micro-batches; the missing ones are empty lists (padding).

    Raises:
        ValueError: fewer samples than ``world_size * minibatches`` (some optimizer step would have
            no data), or a non-positive size.
    """
    if min(world_size, minibatches, micro_batch_size) < 1:
        raise ValueError(f"world_size, minibatches, micro_batch_size must be >= 1, got "
                         f"{world_size}, {minibatches}, {micro_batch_size}")
    if num_samples < world_size * minibatches:
        raise ValueError(f"a batch of {num_samples} samples cannot feed {world_size} learner ranks x "
                         f"{minibatches} minibatches: need at least {world_size * minibatches}")
    chunks = []  # [rank][minibatch] -> indices
    for r in range(world_size):
        shard = list(range(r, num_samples, world_size))
        q, extra = divmod(len(shard), minibatches)
        bounds = [k * q + min(k, extra) for k in range(minibatches + 1)]
        chunks.append([shard[bounds[k]: bounds[k + 1]] for k in range(minibatches)])
    plan = [[[] for _ in range(minibatches)] for _ in range(world_size)]
    for k in range(minibatches):
        passes = max(math.ceil(len(chunks[r][k]) / micro_batch_size) for r in range(world_size))
        for r in range(world_size):
            c = chunks[r][k]
            plan[r][k] = [c[i * micro_batch_size: (i + 1) * micro_batch_size] for i in range(passes)]
    return plan


def prox_schedule(plan: list[list[list[list[int]]]], rank: int, micro_batch_size: int) -> list[list[int]]:
    """Sample indices per no-grad pi_prox forward pass of ``rank``, given a `plan_microbatches` plan.

    The rank's samples in plan order, in chunks of ``micro_batch_size``, then empty lists (padding
    passes) up to the largest pass count of any rank. The plan is the same on every rank, so every
    rank arrives at the same number of passes without communicating.
    """
    def share(r: int) -> list[int]:
        return [i for mb in plan[r] for micro in mb for i in micro]

    passes = max(math.ceil(len(share(r)) / micro_batch_size) for r in range(len(plan)))
    mine = share(rank)
    own = [mine[i: i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]
    return own + [[] for _ in range(passes - len(own))]
