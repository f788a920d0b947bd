"""`LearnerGroup`'s wait on a call of every rank, with small real Ray actors as ranks: a rank that dies while
its peer blocks (as a peer does in an NCCL collective whose other end vanished) is named at once, the blocked
survivor is stopped, and the group refuses later calls instead of queueing them behind the blocked one."""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import pytest

from learner.group import LearnerGroup, LearnerRankDied


def _ranks(ray, n: int) -> list:
    @ray.remote(num_cpus=0)
    class Rank:
        def block(self) -> None:  # inside a collective whose peer is gone: never returns on its own
            time.sleep(3600)

        def die(self) -> None:
            os._exit(1)

        def ping(self) -> str:
            return "ok"

    ranks = [Rank.remote() for _ in range(n)]
    assert ray.get([r.ping.remote() for r in ranks], timeout=60) == ["ok"] * n
    return ranks


def _group(ranks: list, step_timeout_s: float) -> LearnerGroup:
    """The real `LearnerGroup` over the given actors (its constructor would start DeepSpeed ranks)."""
    group = object.__new__(LearnerGroup)
    group.cfg, group.ranks = SimpleNamespace(step_timeout_s=step_timeout_s), ranks
    return group


def test_a_rank_dying_while_its_peer_blocks_raises_at_once_and_stops_the_peer(ray_local):
    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ranks = _ranks(ray, 3)
    group = _group(ranks, step_timeout_s=60)
    t0 = time.monotonic()
    with pytest.raises(LearnerRankDied, match=r"learner rank 1 died during save_checkpoint \(\w*Actor\w*Error\)"):
        group._get([ranks[0].block.remote(), ranks[1].die.remote(), ranks[2].ping.remote()], "save_checkpoint")
    assert time.monotonic() - t0 < 20  # not the 60 s step timeout
    with pytest.raises(ray.exceptions.RayActorError):  # the blocked survivor was stopped, not left in its call
        ray.get(ranks[0].ping.remote(), timeout=30)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"refuses sequence_logprobs: it failed earlier \(learner rank 1 died"):
        group._get([r.ping.remote() for r in ranks], "sequence_logprobs")
    assert time.monotonic() - t0 < 5


def test_without_a_death_every_rank_is_awaited_and_an_error_comes_in_rank_order(ray_local):
    ray = ray_local
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ranks = _ranks(ray, 2)
    group = _group(ranks, step_timeout_s=60)
    assert group._get([r.ping.remote() for r in ranks], "sequence_logprobs") == ["ok", "ok"]
    with pytest.raises(TimeoutError, match=r"learner rank\(s\) \[0\] did not finish save_checkpoint within 2 s"):
        group._get([ranks[0].block.remote(), ranks[1].ping.remote()], "save_checkpoint", timeout=2)
    assert group.failed is None  # a slow rank is not a dead one
