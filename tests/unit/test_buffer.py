import pytest

from buffer import ReplayBuffer, Sample


def _group(key: str, version: int, n: int = 2) -> list[Sample]:
    return [Sample("p", key, [1, 2], [3, 4], [-0.1, -0.2], [version, version]) for _ in range(n)]


def test_sample_validates_lengths_and_staleness():
    s = Sample("p", "g", [1], [2, 3, 4], [-1.0, -1.0, -1.0], [2, 3, 3])
    assert s.loss_mask == [1, 1, 1] and s.oldest_version == 2 and s.staleness(5) == 3
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        Sample("p", "g", [1], [2, 3], [-1.0], [0, 0])


def test_take_batch_drops_stale_groups_and_counts_them():
    buf = ReplayBuffer()
    buf.add_groups([_group("old", 0), _group("ok", 1), _group("new", 2)])
    groups, stats = buf.take_batch(2, learner_version=2, min_version=1)
    m = stats.metrics
    assert stats.group_ids == ("ok", "new")
    assert [g[0].group_id for g in groups] == ["ok", "new"]
    assert m["off_policy/dropped_samples"] == 2 and m["off_policy/staleness_max"] == 1
    assert m["off_policy/dropped_frac"] == pytest.approx(2 / 6)
    assert m["off_policy/staleness_frac_0"] == 0.5 and m["off_policy/staleness_frac_1"] == 0.5
    assert buf.size() == 0


def test_state_dict_round_trip_continues_identically():
    a = ReplayBuffer()
    a.add_groups([_group("x", 0), _group("y", 1), _group("z", 1)])
    first, _ = a.take_batch(1, learner_version=1, min_version=1)  # drops x, returns y
    assert [g[0].group_id for g in first] == ["y"]
    b = ReplayBuffer()
    b.load_state_dict(a.state_dict())
    ga, ma = a.take_batch(5, 1, 1)
    gb, mb = b.take_batch(5, 1, 1)
    assert [g[0].group_id for g in ga] == [g[0].group_id for g in gb] == ["z"]
    assert ma == mb


def test_bad_input_loses_no_data():
    buf = ReplayBuffer(capacity_groups=1)
    buf.add_groups([_group("a", 0)])
    with pytest.raises(ValueError, match="full"):
        buf.add_groups([_group("b", 0)])
    with pytest.raises(ValueError, match="empty group"):
        buf.add_groups([[]])
    assert buf.size() == 1


def test_drop_stale_frees_the_batch_and_reports_with_the_next_one():
    buf = ReplayBuffer()
    buf.add_groups([_group("old", 0), _group("ok", 1), _group("new", 2)])
    assert buf.drop_stale(min_version=1) == {"fresh": 2, "dropped_ids": ["old"]}
    groups, stats = buf.take_batch(2, learner_version=2, min_version=1)
    assert [g[0].group_id for g in groups] == ["ok", "new"]
    assert stats.metrics["off_policy/dropped_samples"] == 2.0  # dropped before the batch, reported with it
    assert buf.take_batch(1, 2, 1)[1].metrics["off_policy/dropped_samples"] == 0.0


def test_ledger_accounts_for_every_group_without_copying_samples():
    buf = ReplayBuffer(dynamic_sampling=True)
    groups = [_group(f"g{i}", 0) for i in range(3)]
    for g, rewards in zip(groups, [[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]):
        for s, r in zip(g, rewards):
            s.reward = r
    buf.add_groups(groups)
    buf.take_batch(1, learner_version=0, min_version=0)
    buf.drop_stale(min_version=1)
    assert buf.ledger() == {"held": set(), "taken": {"g0"}, "filtered": 1, "dropped": 1}
