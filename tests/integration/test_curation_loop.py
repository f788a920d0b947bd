"""Curation in the real loop: dynamic sampling refills batches with informative groups, the difficulty
sampler is fed, SPO trains on single-sample groups, and a task without signal stops with a clear error."""

from __future__ import annotations

import json

import pytest

from orchestrator.loop import Trainer
from rollout.tasks import load_problems
from tiny_run import tiny_run_config

pytestmark = pytest.mark.integration


def _cfg(model: str, tmp_path, *extra: str):
    return tiny_run_config(model, tmp_path, "num_steps=2", "learner.micro_batch_size=4", "seed=5", *extra)


def _run(cfg, model, run_dir) -> list[dict]:
    t = Trainer(cfg, run_dir, model, load_problems(cfg.data, "train"), [])
    try:
        t.run(progress=False)
        sampler_state = t.sampler.state_dict()
    finally:
        t.shutdown()
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:], sampler_state


@pytest.mark.timeout(600)
def test_dynamic_sampling_with_difficulty_sampler(tiny_sums_model, ray_local, tmp_path):
    cfg = _cfg(tiny_sums_model, tmp_path, "buffer.dynamic_sampling=true", "buffer.prompt_sampler=difficulty",
               "buffer.max_staleness=1")
    recs, state = _run(cfg, tiny_sums_model, tmp_path / "run")
    assert len(recs) == 2
    generated = sum(r["curation/groups_generated"] for r in recs)
    for r in recs:
        assert r["learner/zero_variance_group_frac"] == 0.0  # only informative groups were trained
        assert r["curation/effective_samples"] > 0
        assert r["curation/rollouts_per_trained_sample"] >= 1.0
    # the refill cost is visible: more groups generated than trained whenever some were filtered
    last = recs[-1]
    assert last["curation/filter_groups_seen"] >= 8 and last["curation/filter_groups_kept"] >= 8
    assert last["curation/filter_groups_seen"] - last["curation/filter_groups_kept"] == pytest.approx(
        last["curation/filter_zero_variance_frac"] * last["curation/filter_groups_seen"])
    assert generated >= 8
    # the sampler saw every generated group's rewards
    seen = sum(a + b for a, b in state["tracker"]["counts"].values())
    assert seen == pytest.approx(last["curation/filter_groups_seen"] * cfg.rollout.group_size)


@pytest.mark.timeout(600)
def test_spo_trains_single_sample_groups(tiny_sums_model, ray_local, tmp_path):
    cfg = _cfg(tiny_sums_model, tmp_path, "rollout.group_size=1", "prompts_per_step=8", "learner.micro_batch_size=8",
               "learner.advantage=spo", "buffer.value_tracker=true", "buffer.max_staleness=0")
    recs, _ = _run(cfg, tiny_sums_model, tmp_path / "spo")
    assert len(recs) == 2
    assert all(r["curation/effective_samples"] > 0 and abs(r["learner/loss"]) > 0 for r in recs)


@pytest.mark.timeout(300)
def test_dynamic_sampling_without_signal_stops_with_clear_error(tiny_model, ray_local, tmp_path):
    # the untrained tiny model never answers correctly: every group has all-zero rewards
    cfg = _cfg(tiny_model, tmp_path, "buffer.dynamic_sampling=true", "buffer.max_refill_factor=2")
    t = Trainer(cfg, tmp_path / "nosignal", tiny_model, load_problems(cfg.data, "train"), [])
    try:
        with pytest.raises(RuntimeError, match="dynamic sampling generated .* all-equal rewards"):
            t.run(progress=False)
    finally:
        t.shutdown()
