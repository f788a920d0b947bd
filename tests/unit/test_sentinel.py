"""The run-time sentinel's pure parts: the gap (against a hand computation), which samples it scores, the
bound check's one-line error, when a check is due, and its config's validation."""

from __future__ import annotations

import math

import pytest
import torch

from buffer import RolloutResult, Sample
from learner.sentinel import logprob_gap, probe_samples
from orchestrator import sentinel as sentinel_mod
from orchestrator.config import ConfigError, SentinelConfig, load_config
from orchestrator.sentinel import Sentinel, SentinelError, check_gap


def test_gap_equals_a_hand_computation():
    learner = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    engine = torch.tensor([[-1.2, -2.0, -9.0], [-0.4, -2.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])  # the third column is not compared
    d = [0.2, 0.0, 0.3, -1.0]  # learner - engine on the compared tokens
    g = logprob_gap(learner, engine, mask)
    assert g["tokens"] == 4
    assert g["mean_abs_logprob_diff"] == pytest.approx(sum(abs(x) for x in d) / 4)
    assert g["max_abs_logprob_diff"] == pytest.approx(1.0)
    assert g["mismatch_kl"] == pytest.approx(sum(math.exp(x) - 1 - x for x in d) / 4)


def test_gap_is_zero_for_equal_logprobs_and_for_no_tokens():
    lp = torch.randn(2, 5).log_softmax(-1)
    g = logprob_gap(lp, lp.clone(), torch.ones(2, 5))
    assert g["mean_abs_logprob_diff"] == 0.0 and g["mismatch_kl"] == 0.0 and g["tokens"] == 10
    assert logprob_gap(lp, lp + 1, torch.zeros(2, 5)) == {"tokens": 0.0, "mean_abs_logprob_diff": 0.0,
                                                          "max_abs_logprob_diff": 0.0, "mismatch_kl": 0.0}


def test_gap_refuses_tensors_of_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_gap(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def _s(group: str, versions: list[int], mask: list[int] | None = None, status: str = "completed") -> Sample:
    n = len(versions)
    return Sample("p", group, [1, 2], list(range(n)), [0.0] * n, versions, mask or [1] * n, status=status)


def test_probe_samples_take_groups_round_robin_with_tokens_of_the_version():
    a = [_s("a", [3, 3]), _s("a", [3]), _s("a", [3])]
    b = [_s("b", [2, 2]), _s("b", [2, 3]), _s("b", [3], mask=[0])]  # only b1 has a trained token of version 3
    c = [_s("c", [3], status="failed"), _s("c", [3, 3])]
    picked = probe_samples([a, b, c], 3, 4)
    assert picked == [a[0], b[1], c[1], a[1]]
    assert probe_samples([a, b, c], 4, 8) == []
    assert probe_samples([], 0, 8) == []


def test_check_gap_passes_under_the_bounds_and_stops_with_one_line_over_them():
    cfg = SentinelConfig(max_mean_abs_logprob_diff=0.1, max_mismatch_kl=0.02)
    check_gap({"mean_abs_logprob_diff": 0.05, "mismatch_kl": 0.01, "tokens": 100}, 0, 3, cfg)
    for d, kl in [(0.84, 0.01), (0.05, 0.31)]:
        with pytest.raises(SentinelError) as e:
            check_gap({"mean_abs_logprob_diff": d, "mismatch_kl": kl, "tokens": 100}, 1, 3, cfg)
        msg = str(e.value)
        assert "\n" not in msg
        assert msg.startswith(f"sentinel: rollout worker 1 at weights version 3: mean |learner - engine logprob| "
                              f"= {d:.4g} nats/token (bound 0.1), mismatch KL {kl:.4g} (bound 0.02)")
        assert "sentinel.every_steps = 0" in msg


class _Buffer:
    class peek_groups:  # noqa: N801 (a Ray actor method's shape: .remote)
        @staticmethod
        def remote(keys):
            return ("peek", tuple(keys))


class _Learner:
    def __init__(self):
        self.calls = []

    def probe_remote(self, groups_ref, version, num_samples):
        self.calls.append((groups_ref, version, num_samples))
        return ["rank0"]


def _result(worker: int, keys: tuple[str, ...]) -> RolloutResult:
    return RolloutResult(worker, keys, (), 0, 0, 0, 0, 0.0)


def test_a_check_waits_for_responses_sampled_at_its_version_and_schedules_the_next(monkeypatch):
    gaps = iter([{"tokens": 5.0, "mean_abs_logprob_diff": 1e-4, "max_abs_logprob_diff": 1e-3, "mismatch_kl": 1e-8,
                  "seconds": 0.1}])
    monkeypatch.setattr(sentinel_mod, "wait_all", lambda refs, timeout, what: [next(gaps)])
    s = Sentinel(SentinelConfig(every_steps=3, num_samples=4), max_staleness=1, num_steps=10)
    buf, learner = _Buffer(), _Learner()
    assert s.holds(0) and s.start(buf, learner, 0) is None
    s.saw(0, _result(1, ()))  # every group filtered: nothing to score
    assert s.holds(0)
    s.saw(0, _result(1, ("g0", "g1")))
    s.saw(0, _result(0, ("g2",)))  # the first one is kept
    assert not s.holds(0)
    probe = s.start(buf, learner, 0)
    assert probe.worker == 1 and probe.version == 0 and learner.calls == [(("peek", ("g0", "g1")), 0, 4)]
    m = s.finish(probe, 60)
    assert m["sentinel/mean_abs_logprob_diff"] == 1e-4 and m["sentinel/worker"] == 1.0
    assert not s.holds(1) and not s.holds(2) and s.holds(3)
    s.saw(2, _result(0, ("g9",)))  # admitted before version 3: sampled with older weights
    assert s.holds(3)


def test_a_check_without_tokens_of_its_version_is_repeated_at_the_next_step(monkeypatch):
    monkeypatch.setattr(sentinel_mod, "wait_all", lambda refs, timeout, what: [{"tokens": 0.0, "seconds": 0.0}])
    s = Sentinel(SentinelConfig(every_steps=5), max_staleness=0, num_steps=10)
    s.saw(0, _result(0, ("g0",)))
    assert s.finish(s.start(_Buffer(), _Learner(), 0), 60) == {}
    assert s.due == 1 and s.holds(1)


def test_no_check_where_no_request_can_be_sampled_at_the_version():
    assert Sentinel(SentinelConfig(every_steps=0), 0, 10).due is None
    s = Sentinel(SentinelConfig(every_steps=2), max_staleness=2, num_steps=10)
    s.start_at(7)  # a resume at 7: versions 8 and 9 are trained on requests admitted before version 8
    assert s.due == 7
    s.start_at(8)
    assert s.due is None and not s.holds(9)


def test_sentinel_config_defaults_and_bounds():
    cfg = load_config(None, ["sentinel.every_steps=0"])
    assert cfg.sentinel.every_steps == 0 and load_config(None).sentinel.every_steps > 0
    for bad in ["sentinel.every_steps=-1", "sentinel.num_samples=0", "sentinel.max_mean_abs_logprob_diff=0",
                "sentinel.max_mismatch_kl=-1", "sentinel.bound=1"]:
        with pytest.raises(ConfigError, match=r"sentinel\."):
            load_config(None, [bad])



def test_a_check_is_skipped_when_every_group_at_its_version_is_filtered():
    s = Sentinel(SentinelConfig(every_steps=4), max_staleness=0, num_steps=20)
    for _ in range(sentinel_mod.MAX_EMPTY_RESULTS - 1):
        s.saw(0, _result(0, ()))
    assert s.holds(0)
    s.saw(0, _result(0, ()))
    assert not s.holds(0) and s.due == 4 and s.empty == 0
