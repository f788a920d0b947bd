"""`ray.wait_for_resources_s`: waiting for an autoscaler to provide the run's resources (orchestrator.placement).

Runs against the shared local Ray instance (`ray_local`: 4 CPUs, no GPU). A cluster that grows during the
wait would need a second node started by the test, so that one case fakes `ray.cluster_resources` growing.
"""

from __future__ import annotations

import logging
import time

import pytest

from orchestrator.config import ConfigError, load_config
from orchestrator.placement import wait_for_resources

NEEDS_5_CPUS = ["learner.num_cpus=4", "rollout.num_cpus=1"]  # the local instance has 4


@pytest.fixture
def requests(monkeypatch):
    """Records each autoscaler request (and still makes it, on the real local instance)."""
    import ray.autoscaler.sdk as sdk

    calls, real = [], sdk.request_resources
    monkeypatch.setattr(sdk, "request_resources", lambda **kw: (calls.append(kw), real(**kw))[1])
    return calls


def test_zero_fails_at_once_naming_what_is_missing(ray_local, requests):
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"needs 5 CPU \(learner: 1 x 4, rollout: 1 x 1\) but the Ray cluster has 4; "
                                           r".*set ray.wait_for_resources_s"):
        wait_for_resources(load_config(None, NEEDS_5_CPUS), 0)
    assert time.monotonic() - t0 < 2 and requests == []  # fail fast, nothing asked of an autoscaler


def test_times_out_after_reporting_what_it_waits_for(ray_local, requests, caplog):
    caplog.set_level(logging.INFO, logger="orchestrator.placement")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"needs 5 CPU .* has 4, still missing after waiting 1.5 s"):
        wait_for_resources(load_config(None, NEEDS_5_CPUS), 1.5, poll_s=0.1, report_every_s=0.5)
    assert 1.5 <= time.monotonic() - t0 < 10
    waits = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
    assert len(waits) >= 2 and all("5 CPU" in m and "has 4" in m for m in waits)
    assert requests[0]["bundles"] == [{"CPU": 4.0}, {"CPU": 1.0}]  # the autoscaler is told the run's bundles
    assert requests[-1] == {"bundles": []}  # and the request withdrawn when the wait ends


def test_enough_resources_return_at_once(ray_local, requests):
    t0 = time.monotonic()
    wait_for_resources(load_config(None, ["learner.num_cpus=2", "rollout.num_cpus=2"]), 600)
    assert time.monotonic() - t0 < 2 and requests == []


def test_returns_once_the_cluster_has_grown(ray_local, requests, monkeypatch):
    totals = iter([{"CPU": 4.0}] * 3 + [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 2.0}])
    last = {}

    def growing() -> dict[str, float]:
        last.update(next(totals, last))
        return dict(last)

    monkeypatch.setattr(ray_local, "cluster_resources", growing)
    cfg = load_config(None, ["learner.num_gpus=1", "learner.num_cpus=4", "rollout.num_gpus=1",
                             "rollout.num_cpus=4"])
    wait_for_resources(cfg, 30, poll_s=0.05)
    assert last == {"CPU": 8.0, "GPU": 2.0}  # it waited for the totals that cover the run, no longer
    assert requests[0]["bundles"] == [{"CPU": 4.0, "GPU": 1.0}] * 2 and requests[-1] == {"bundles": []}


def test_the_option_is_bounded():
    assert load_config(None).ray.wait_for_resources_s == 0  # fail fast unless asked to wait
    with pytest.raises(ConfigError, match=r"ray.wait_for_resources_s.*(got -1)"):
        load_config(None, ["ray.wait_for_resources_s=-1"])
