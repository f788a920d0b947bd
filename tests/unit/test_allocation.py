"""Rollout budgets: Knapsack allocation over a step's prompts, uniform sizes, and resume."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from buffer.allocation import RolloutAllocator
from buffer.prompt_sampler import DifficultySampler, UniformSampler
from learner.advantages import ADVANTAGE_ESTIMATORS, batch_advantages, grpo_advantages
from buffer import Problem
from learner.batching import BatchShape, assign_ranks, forward_tokens, plan_microbatches, prox_schedule, restrict_plan


def _problems(n: int) -> list[Problem]:
    return [Problem(prompt_id=f"p{i}", question=f"{i}+0", answer=str(i)) for i in range(n)]


def test_uniform_allocation_gives_group_size():
    alloc = RolloutAllocator("uniform", 4, prompts_per_step=3)
    problems, sizes = alloc.take(UniformSampler(_problems(5), seed=0), 7)
    assert len(problems) == 7 and sizes == [4] * 7
    assert alloc.metrics() == {"curation/group_size_mean": 4.0, "curation/group_size_min": 4.0,
                               "curation/group_size_max": 4.0}


def test_knapsack_spends_the_step_budget_on_the_learning_zone():
    sampler = UniformSampler(_problems(4), seed=0)
    for pid, rewards in [("p0", [1.0] * 20), ("p1", [0.0] * 20), ("p2", [1.0, 0.0] * 10), ("p3", [1.0, 0.0] * 10)]:
        sampler.update(pid, rewards)  # p0 always solved, p1 never, p2/p3 half the time
    alloc = RolloutAllocator("knapsack", 4, prompts_per_step=4, min_n=2, max_n=8)
    problems, sizes = alloc.take(sampler, 4)
    by_id = dict(zip([p.prompt_id for p in problems], sizes))
    assert sum(sizes) == 16  # the budget of one step: prompts_per_step * group_size
    assert by_id["p0"] == by_id["p1"] == 2  # solved / failed prompts get only the minimum
    assert by_id["p2"] == by_id["p3"] == 6


def test_knapsack_allocates_whole_steps_across_requests():
    alloc = RolloutAllocator("knapsack", 4, prompts_per_step=6, min_n=2, max_n=8)
    sampler = UniformSampler(_problems(10), seed=1)
    sizes = [n for _ in range(4) for n in alloc.take(sampler, 3)[1]]  # 4 requests of 3 = 2 steps of 6
    assert sum(sizes[:6]) == sum(sizes[6:]) == 24


def test_knapsack_state_round_trip_continues_identically():
    def fresh():
        s = DifficultySampler(_problems(12), seed=3, group_size=4)
        s.update("p1", [1.0, 0.0, 0.0, 0.0])
        return s, RolloutAllocator("knapsack", 4, prompts_per_step=5, min_n=2, max_n=8)

    s1, a1 = fresh()
    a1.take(s1, 2)  # leaves 3 allocated prompts queued
    s2, a2 = fresh()
    s2.load_state_dict(s1.state_dict())
    a2.load_state_dict(a1.state_dict())
    for _ in range(3):
        assert a1.take(s1, 4) == a2.take(s2, 4)


def test_allocation_rejects_bad_settings():
    with pytest.raises(ValueError, match="'greedy'"):
        RolloutAllocator("greedy", 4, 2)
    with pytest.raises(ValueError, match="min_n <= group_size <= max_n"):
        RolloutAllocator("knapsack", 40, 2, min_n=2, max_n=8)


# ---- ragged groups through advantages and the learner's batch plan --------------------------------------

@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "reinforce_pp"])
def test_ragged_batch_matches_equal_size_batches(name):
    groups = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0]]
    adv, _ = batch_advantages(name, groups)
    ref, _ = ADVANTAGE_ESTIMATORS[name](torch.tensor(groups))
    assert adv == pytest.approx(ref.flatten().tolist(), abs=1e-6)


def test_ragged_groups_are_normalised_within_their_own_size():
    adv, m = batch_advantages("grpo", [[1.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0, 1.0]])
    assert adv[:2] == pytest.approx(grpo_advantages(torch.tensor([[1.0, 0.0]]))[0].flatten().tolist(), abs=1e-6)
    assert adv[2:] == pytest.approx(grpo_advantages(torch.tensor([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0]]))[0]
                                    .flatten().tolist(), abs=1e-6)
    rloo, _ = batch_advantages("rloo", [[1.0, 0.0], [1.0, 0.0, 0.0]])
    assert rloo == pytest.approx([1.0, -1.0, 1.0, -0.5, -0.5])  # r_i - mean of the others, per group
    assert m["learner/zero_variance_group_frac"] == 0.0


def test_single_sample_group_is_refused_by_group_estimators():
    with pytest.raises(ValueError, match="group of 1"):
        batch_advantages("grpo", [[1.0, 0.0], [1.0]])
    adv, _ = batch_advantages("spo", [[1.0, 0.0], [1.0]], [[0.5, 0.5], [0.2]])
    assert len(adv) == 3


def _shape(groups: list[tuple[int, list[int]]]) -> BatchShape:
    """``(prompt tokens, [response tokens per sample])`` per group."""
    g, p, r = [], [], []
    for k, (prompt, responses) in enumerate(groups):
        g += [k] * len(responses)
        p += [prompt] * len(responses)
        r += responses
    return BatchShape(g, p, r)


shapes = st.lists(st.tuples(st.integers(1, 40), st.lists(st.integers(0, 30), min_size=1, max_size=8)),
                  min_size=1, max_size=24).map(_shape)


@settings(max_examples=200, deadline=None)
@given(shape=shapes, world=st.integers(1, 4), minibatches=st.integers(1, 4), micro=st.integers(1, 9),
       budget=st.sampled_from([0, 0, 40, 64, 200]), shared=st.booleans())
def test_batch_plan_covers_every_sample_once_in_lockstep(shape, world, minibatches, micro, budget, shared):
    n = len(shape.group)
    too_long = budget and max(p + r for p, r in zip(shape.prompt_tokens, shape.response_tokens)) > budget
    shares = assign_ranks(shape, world)
    if max(map(len, shares)) < minibatches or too_long:
        short = max(map(len, shares)) < minibatches  # checked first
        with pytest.raises(ValueError, match="ppo_minibatches" if short else "max_tokens_per_microbatch"):
            plan_microbatches(shape, world, minibatches, micro, budget, shared)
        return
    plan = plan_microbatches(shape, world, minibatches, micro, budget, shared)
    flat = sorted(i for r in plan for mb in r for m in mb for i in m)
    assert flat == list(range(n))
    for r in range(world):  # a group never spans two ranks
        mine = {shape.group[i] for mb in plan[r] for m in mb for i in m}
        assert all(shape.group[i] not in mine for q in range(world) if q != r for mb in plan[q] for m in mb for i in m)
    for k in range(minibatches):
        assert len({len(plan[r][k]) for r in range(world)}) == 1  # same passes per optimizer step on every rank
        assert any(m for r in range(world) for m in plan[r][k])  # no optimizer step without data
        for r in range(world):
            real = [m for m in plan[r][k] if m]
            assert plan[r][k][: len(real)] == real  # padding only at the end
            if budget:
                assert all(forward_tokens(shape, m, shared) <= budget for m in real)
            else:
                assert all(len(m) <= micro for m in real)


def test_groups_go_to_ranks_whole_and_balanced_by_tokens():
    # prompt + responses: 100, 60, 50, 40, 10 tokens; LPT on 2 ranks: {100, 40} = 140, {60, 50, 10} = 120
    shape = _shape([(10, [45, 45]), (20, [20, 20]), (10, [20, 20]), (10, [10, 10, 10]), (4, [3, 3])])
    shares = assign_ranks(shape, 2)
    load = [sum(forward_tokens(shape, [i for i in s if shape.group[i] == g], True) for g in {shape.group[i] for i in s})
            for s in shares]
    assert load == [140, 120] and shares[0] == [0, 1, 6, 7, 8]
    # round-robin by sample (the old plan) would split every group over both ranks


def test_a_sample_longer_than_the_token_budget_is_named():
    shape = _shape([(10, [5, 5]), (30, [50])])
    with pytest.raises(ValueError, match=r"a sample of 80 tokens \(30 prompt \+ 50 response\).*= 64"):
        plan_microbatches(shape, 1, 1, 8, max_tokens_per_microbatch=64)
    # shared prefix: the prompt counts once per micro-batch, so a budget of 30 takes 10 + 5 + 5 + ... samples
    plan = plan_microbatches(_shape([(10, [5] * 6)]), 1, 1, 8, max_tokens_per_microbatch=30)
    assert [len(m) for m in plan[0][0]] == [4, 2]
    plan = plan_microbatches(_shape([(10, [5] * 6)]), 1, 1, 8, max_tokens_per_microbatch=30, shared_prefix=False)
    assert [len(m) for m in plan[0][0]] == [2, 2, 2]  # padded rows: 15 tokens each


def test_prox_recompute_runs_the_same_passes_on_every_rank_for_ragged_batches():
    # a group of 5 and a group of 1 on 2 ranks: rank 0 runs 3 passes of <= 2, rank 1 one pass and 2 of padding
    plan = plan_microbatches(_shape([(3, [4] * 5), (3, [4])]), 2, 1, 2)
    s0, s1 = prox_schedule(plan, 0), prox_schedule(plan, 1)
    assert s0 == [[0, 1], [2, 3], [4]] and s1 == [[5], [], []]


@settings(max_examples=200, deadline=None)
@given(shape=shapes, world=st.integers(1, 4), minibatches=st.integers(1, 4), micro=st.integers(1, 9))
def test_prox_schedule_covers_each_rank_share_once_in_lockstep(shape, world, minibatches, micro):
    if max(map(len, assign_ranks(shape, world))) < minibatches:
        return
    plan = plan_microbatches(shape, world, minibatches, micro)
    schedules = [prox_schedule(plan, r) for r in range(world)]
    assert len({len(s) for s in schedules}) == 1  # ZeRO-3: every forward all-gathers on every rank
    for r, s in enumerate(schedules):
        assert [i for p in s for i in p] == [i for mb in plan[r] for m in mb for i in m]
        assert all(len(p) <= micro for p in s) and all(s[: sum(1 for p in s if p)])  # padding only at the end


@settings(max_examples=200, deadline=None)
@given(shape=shapes, world=st.integers(1, 4), minibatches=st.integers(1, 4), micro=st.integers(1, 9),
       budget=st.sampled_from([0, 64, 200]), keep_bits=st.lists(st.booleans(), min_size=200, max_size=200))
def test_restricted_plan_keeps_each_kept_sample_on_its_rank_and_minibatch(shape, world, minibatches, micro, budget,
                                                                          keep_bits):
    if max(map(len, assign_ranks(shape, world))) < minibatches or (
            budget and max(p + r for p, r in zip(shape.prompt_tokens, shape.response_tokens)) > budget):
        return
    plan = plan_microbatches(shape, world, minibatches, micro, budget)
    keep = keep_bits[: len(shape.group)]
    out = restrict_plan(plan, shape, keep, micro, budget)
    where = {i: (r, k) for r in range(world) for k in range(minibatches) for m in plan[r][k] for i in m}
    got = {i: (r, k) for r in range(world) for k in range(minibatches) for m in out[r][k] for i in m}
    assert got == {i: rk for i, rk in where.items() if keep[i]}  # each kept sample once, where it was
    assert sum(len(m) for r in out for mb in r for m in mb) == sum(keep)
    for k in range(minibatches):
        assert len({len(out[r][k]) for r in range(world)}) == 1 and len(out[0][k]) >= 1  # lockstep, a step each
        for r in range(world):
            real = [m for m in out[r][k] if m]
            assert out[r][k][: len(real)] == real and len(real) <= len([m for m in plan[r][k] if m])
            assert all(forward_tokens(shape, m, True) <= budget for m in real) if budget else \
                all(len(m) <= micro for m in real)


def test_a_minibatch_with_nothing_kept_is_one_padding_pass_per_rank():
    shape = _shape([(3, [4, 4]), (3, [4, 4])])
    plan = plan_microbatches(shape, 2, 1, 2)
    assert restrict_plan(plan, shape, [False] * 4, 2) == [[[[]]], [[[]]]]
    assert restrict_plan(plan, shape, [True, False, False, False], 2) == [[[[0]]], [[[]]]]
    with pytest.raises(ValueError, match="3 keep flags for a batch of 4"):
        restrict_plan(plan, shape, [True] * 3, 2)
