"""Placement groups: a learner spec the cluster cannot satisfy fails fast and says why."""

from __future__ import annotations

import time

import pytest

from orchestrator.loop import Trainer
from rollout.tasks import load_problems
from tiny_run import tiny_run_config

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_unplaceable_learner_fails_fast_naming_labels_and_cluster(tiny_model, ray_local, tmp_path):
    cfg = tiny_run_config(tiny_model, tmp_path, 'learner.node_labels={zone = "nowhere"}', "ray.placement_timeout_s=3")
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"cannot place the learner ranks.*labelled \{'zone': 'nowhere'\}.*Cluster totals"):
        Trainer(cfg, tmp_path / "run", tiny_model, load_problems(cfg.data, "train"), [])
    assert time.monotonic() - t0 < 60
    # the reservation was given back: nothing of the failed run holds cluster resources
    from ray.util import placement_group_table

    assert all(pg["state"] == "REMOVED" for pg in placement_group_table().values())
