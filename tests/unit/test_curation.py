"""Curation components: hand-computed values, bounds, and save/load round trips that continue identically."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buffer import (DifficultySampler, PassRateTracker, PromptValueTracker, ReplayBuffer, Sample, UniformSampler,
                    ZeroVarianceFilter, allocate_rollouts)
from buffer.curation import group_priority, informative_group_value
from buffer import Problem


def _group(prompt: str, rewards: list[float]) -> list[Sample]:
    return [Sample(prompt, f"g-{prompt}", [1], [2], [-0.5], [0], reward=r) for r in rewards]


def _problems(n: int) -> list[Problem]:
    return [Problem(f"train/{i}", f"q{i}", str(i)) for i in range(n)]


def test_zero_variance_filter_counts():
    f = ZeroVarianceFilter()
    assert [f.keep(_group("a", r)) for r in ([1, 1], [0, 1], [0, 0], [0.5, 0.5 + 1e-3])] == [False, True, False, True]
    assert f.metrics() == {"curation/filter_groups_seen": 4.0, "curation/filter_groups_kept": 2.0,
                           "curation/filter_zero_variance_frac": 0.5}
    g = ZeroVarianceFilter()
    g.load_state_dict(json.loads(json.dumps(f.state_dict())))
    assert g.metrics() == f.metrics()


def test_buffer_dynamic_sampling_and_value_tracker():
    buf = ReplayBuffer(dynamic_sampling=True, value_tracker_discount=0.5)
    out = buf.add_groups([_group("p", [1, 1]), _group("q", [0, 1]), _group("p", [1, 0])])
    assert out == {"kept": 2, "kept_ids": ["g-q", "g-p"], "held": 2}
    groups, stats = buf.take_batch(2, 0, 0)
    m = stats.metrics
    # prior Beta(1, 1): p's first group sees 0.5; after rewards 1, 1 with discount 0.5:
    # (1*.5+1)*.5+1 = 1.75, (1*.5+0)*.5+0 = 0.25 -> 0.875
    assert [g[0].baseline for g in groups] == [0.5, 0.875]
    assert m["curation/filter_zero_variance_frac"] == pytest.approx(1 / 3)
    other = ReplayBuffer(dynamic_sampling=True, value_tracker_discount=0.5)
    other.load_state_dict(buf.state_dict())
    assert other.values.value("p") == buf.values.value("p") and other.filter.seen == 3


def test_pass_rate_tracker_posterior_and_histogram():
    t = PassRateTracker()
    t.update("a", [1, 1, 1, 0])
    t.update("b", [0, 0])
    assert t.posterior("a") == (4.0, 2.0) and t.mean("b") == 0.25 and t.mean("unseen") == 0.5
    m = t.metrics()
    assert m["curation/prompts_seen"] == 2 and m["curation/pass_rate_frac_0.6_0.8"] == 0.5
    assert m["curation/pass_rate_frac_0.2_0.4"] == 0.5
    with pytest.raises(ValueError, match="prior"):
        PassRateTracker(0.0, 1.0)


def test_value_tracker_baseline_is_read_before_update():
    v = PromptValueTracker(discount=1.0)
    assert v.baseline_then_update("x", [1.0]) == 0.5
    assert v.value("x") == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="discount"):
        PromptValueTracker(discount=1.5)


def test_informative_group_value():
    assert informative_group_value(0.5, 2) == pytest.approx(0.5 * 0.25)
    assert informative_group_value(0.0, 8) == 0.0 and informative_group_value(1.0, 8) == 0.0
    assert informative_group_value(0.3, 1) == 0.0


def test_allocate_rollouts_prefers_uncertain_prompts():
    n = allocate_rollouts([0.5, 0.98, 0.0, 0.2], budget=24, min_n=2, max_n=16)
    assert sum(n) == 24 and n[2] == 2 and n[0] > n[1]
    with pytest.raises(ValueError, match="budget 100"):
        allocate_rollouts([0.5], budget=100, max_n=16)
    with pytest.raises(ValueError, match="pass rates"):
        allocate_rollouts([1.5], budget=4)


@given(st.lists(st.floats(0, 1), min_size=1, max_size=12), st.integers(0, 40))
def test_allocate_rollouts_bounds(rates, extra):
    k = len(rates)
    budget = min(2 * k + extra, 8 * k)
    n = allocate_rollouts(rates, budget, min_n=2, max_n=8)
    assert sum(n) == budget and all(2 <= x <= 8 for x in n)


def test_difficulty_sampler_prefers_learning_zone_and_keeps_a_floor():
    probs = _problems(3)
    s = DifficultySampler(probs, seed=0, group_size=8, floor=0.1)
    for _ in range(5):
        s.update("train/0", [1.0] * 8)  # always solved
        s.update("train/1", [1.0, 0.0] * 4)  # learning zone
        s.update("train/2", [0.0] * 8)  # never solved
    p = s.probabilities()
    assert p[1] > 0.9 * (1 - 0.1) and min(p) >= 0.1 / 3 - 1e-12 and p.sum() == pytest.approx(1.0)
    picks = [x.prompt_id for _ in range(200) for x in s.take(1)]
    assert picks.count("train/1") > 150 and picks.count("train/0") > 0  # floor: never starved


def test_difficulty_sampler_takes_distinct_prompts_and_explores_unseen():
    s = DifficultySampler(_problems(10), seed=1, floor=0.0)
    for i in range(5):
        for _ in range(10):  # solved 80 times: posterior mean 0.988, value ~1e-3 vs 0.25 unseen
            s.update(f"train/{i}", [1.0] * 8)
    batch = [x.prompt_id for x in s.take(5)]
    assert len(set(batch)) == 5 and all(int(x.split("/")[1]) >= 5 for x in batch)


@pytest.mark.parametrize("cls", [UniformSampler, DifficultySampler])
def test_sampler_state_round_trip_continues_identically(cls):
    probs = _problems(7)
    a = cls(probs, seed=3, group_size=4)
    for i, x in enumerate(a.take(9)):
        a.update(x.prompt_id, [float(i % 2), 1.0, 0.0, 1.0])
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON checkpoint
    b = cls(probs, seed=3, group_size=4)
    b.load_state_dict(state)
    assert [x.prompt_id for x in a.take(12)] == [x.prompt_id for x in b.take(12)]


def test_group_priority_and_prioritized_take():
    flat = _group("a", [1.0, 1.0])
    mixed = _group("b", [1.0, 0.0])
    mixed[1].response_ids = [3]  # two distinct responses
    assert group_priority(flat) == pytest.approx(0.5 * 0.5)
    assert group_priority(mixed) == pytest.approx(0.5 + 0.5 * 1.0)
    buf = ReplayBuffer(prioritized=True)
    old_good = _group("old", [0.0, 1.0])  # version 0: too stale at learner version 2
    buf.add_groups([old_good, flat, mixed])
    for s in flat + mixed:
        s.policy_versions = [2]
    groups, stats = buf.take_batch(1, learner_version=2, min_version=1)
    assert groups == [mixed] and stats.metrics["off_policy/dropped_samples"] == 2.0  # stale one dropped, not trained
    assert buf.take_batch(5, 2, 1)[0] == [flat]


def test_failed_rewards_count_in_no_buffer_statistic():
    """A sample whose reward function failed carries reward 0.0 as a placeholder: dynamic sampling, the
    SPO value tracker and replay priority must judge the group by its scored samples only."""
    group = _group("p", [1.0, 1.0, 0.0])
    group[2].status, group[2].error = "failed", "reward function raised"
    assert ZeroVarianceFilter().keep(group) is False  # all scored rewards equal: no signal
    assert group_priority(group) == pytest.approx(0.5 * 1 / 3)  # reward std 0, one distinct response of 3
    buf = ReplayBuffer(value_tracker_discount=0.5)
    buf.add_groups([group])
    # prior Beta(1, 1), then two rewards of 1 (not three samples): (1*.5+1)*.5+1 = 1.75, (1*.5+0)*.5+0 = 0.25
    assert buf.values.value("p") == pytest.approx(1.75 / 2.0)
