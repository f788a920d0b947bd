"""Learner metrics declare their cross-rank reduction where they are produced; `LearnerGroup.merge_metrics`
applies the declarations (`learner.metrics`)."""

from __future__ import annotations

import pickle

import pytest
import torch

from buffer import Sample
from learner.group import LearnerGroup
from learner.metrics import Metrics, Reduce, merge
from learner.worker import LearnerWorker
from orchestrator.config import RunConfig
from engine_stand_in import StandInEngine


def _rank(tokens: float, loss: float, clipfrac: float, seconds: float, grad_norm: float, rollout: bool) -> Metrics:
    """A rank's metrics as `LearnerWorker.train_step` declares them."""
    m = Metrics().put(Reduce.TOKEN_MEAN, {"learner/pg_clipfrac": clipfrac, "learner/entropy": 2 * clipfrac})
    m.put(Reduce.SUM, {"learner/loss": loss, "learner/tokens": tokens})
    m.put(Reduce.FIRST, {"learner/grad_norm": grad_norm, "learner/samples": 13.0})
    m.put(Reduce.MAX, {"learner/seconds": seconds})
    if rollout:
        m.put(Reduce.FIRST, {"rollout/reward_mean": 0.25})
    return m


def test_two_ranks_merge_by_their_declarations_hand_computed():
    r0 = _rank(tokens=30.0, loss=0.5, clipfrac=0.1, seconds=2.0, grad_norm=1.5, rollout=True)
    r1 = _rank(tokens=10.0, loss=-0.2, clipfrac=0.5, seconds=3.5, grad_norm=1.5, rollout=False)
    m = LearnerGroup.merge_metrics([r0, r1])
    assert m["learner/loss"] == pytest.approx(0.3) and m["learner/tokens"] == 40.0  # sums
    assert m["learner/pg_clipfrac"] == pytest.approx((0.1 * 30 + 0.5 * 10) / 40)  # token-weighted: 0.2
    assert m["learner/entropy"] == pytest.approx((0.2 * 30 + 1.0 * 10) / 40)
    assert m["learner/seconds"] == 3.5  # the slowest rank
    assert (m["learner/grad_norm"], m["learner/samples"], m["rollout/reward_mean"]) == (1.5, 13.0, 0.25)  # rank 0's
    assert list(m) == list(r0)  # rank 0's keys, in its order


def test_mean_and_ranks_without_tokens():
    a, b = Metrics().put(Reduce.MEAN, {"x/y": 1.0}), Metrics().put(Reduce.MEAN, {"x/y": 4.0})
    assert merge([a, b]) == {"x/y": 2.5}
    a = Metrics().put(Reduce.TOKEN_MEAN, {"x/z": 3.0})  # no learner/tokens anywhere: divided by 1, weights 0
    assert merge([a, a]) == {"x/z": 0.0}


def test_an_undeclared_metric_is_refused_by_name():
    m = Metrics().put(Reduce.SUM, {"learner/tokens": 1.0})
    m["learner/new_thing"] = 1.0  # set without a reduction
    with pytest.raises(ValueError, match="'learner/new_thing' declares no cross-rank reduction"):
        merge([m])
    with pytest.raises(TypeError, match="not a learner.metrics.Metrics"):
        merge([{"learner/tokens": 1.0}])
    with pytest.raises(TypeError, match="Reduce"):
        Metrics().put("sum", {"a/b": 1.0})
    a, b = Metrics().put(Reduce.SUM, {"a/b": 1.0}), Metrics().put(Reduce.MAX, {"a/b": 1.0})
    with pytest.raises(ValueError, match="declared sum on rank 0 but \\['max'\\]"):
        merge([a, b])


def test_metrics_cross_process_boundaries_with_their_reductions():
    m = _rank(tokens=3.0, loss=0.1, clipfrac=0.2, seconds=1.0, grad_norm=0.5, rollout=True)
    back = pickle.loads(pickle.dumps(m))
    assert back == m and back.reductions == m.reductions and isinstance(back, Metrics)


# ---- the real producers: every key a training step returns is declared, as the old key table merged it ----

def _table_reduction(key: str) -> Reduce:
    """How `LearnerGroup.merge_metrics` combined ``key`` before each metric declared its own reduction (its
    table of key prefixes, kept here as the reference)."""
    if key in ("learner/loss", "learner/tokens"):
        return Reduce.SUM
    if key.startswith(("rollout/", "curation/", "learner/grad_norm", "learner/lr", "learner/zero_variance",
                       "learner/optimizer_steps", "learner/skipped_steps", "learner/samples",
                       "learner/skipped_sample_frac", "off_policy/sample_weight_mean")):
        return Reduce.FIRST
    if key == "learner/seconds":
        return Reduce.MAX
    return Reduce.TOKEN_MEAN


@pytest.mark.parametrize("loss", ["ppo_tis", "gspo", "clip_cov", "kl_cov", "bapo",
                                  pytest.param({"type": "ppo_tis", "token_selection_rho": 0.5}, id="ppo_tis_rho")])
def test_two_real_ranks_merge_as_the_old_key_table_did(tiny_model, loss):
    """Two ranks of a real `LearnerWorker.train_step` (2 PPO minibatches, so the later-minibatch metrics appear
    too) on a stand-in engine: every key is declared, and merges to what the old table of prefixes gave."""
    from transformers import AutoModelForCausalLM

    cfg = RunConfig.model_validate({
        "model": {"path": "m"}, "prompts_per_step": 4, "num_steps": 1, "rollout": {"group_size": 2},
        "buffer": {"max_staleness": 0},
        "learner": {"micro_batch_size": 1, "ppo_minibatches": 2, "num_learners": 2, "dtype": "fp32",
                    "loss": loss, "prox_logprobs": "recompute", "torch_threads": 1}})
    batch = [[Sample(f"p{g}", f"g{g}", [1, 5 + g], [9, 11 + i, 2 + g][: 2 + i], [-2.0] * (2 + i), [0] * (2 + i),
                     reward=float(i)) for i in range(2)] for g in range(4)]
    per_rank = []
    for rank in range(2):
        worker = LearnerWorker(cfg.learner, tiny_model, rank=rank, world_size=2, samples_per_step=8,
                               max_tokens=4, temperature=1.0, seed=0)
        worker.engine = StandInEngine(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
        worker.ref_model = None
        per_rank.append(worker.train_step(batch, version=0))
    r0, r1 = per_rank
    assert {"learner/intra_batch_drift", "off_policy/prox_loglinear_abs_err", "rollout/reward_mean",
            "learner/entropy", "learner/entropy_p10", "learner/entropy_p90"} <= set(r0)
    assert r0["learner/entropy_p10"] <= r0["learner/entropy_p50"] <= r0["learner/entropy_p90"]
    assert {"clip_cov": {"learner/cov_clipped_frac", "learner/cov_max"}, "kl_cov": {"learner/cov_kl_frac"},
            "bapo": {"learner/bapo_clip_low", "learner/bapo_pos_share"}}.get(cfg.learner.loss.type, set()) <= set(r0)
    assert ("learner/entropy_selected_frac" in r0) == (cfg.learner.loss.token_selection_rho < 1)
    assert ("learner/pg_clipfrac" in r0) == (cfg.learner.loss.type != "kl_cov")  # KL-Cov has no clip
    assert set(r0.reductions) == set(r0) and set(r1.reductions) == set(r1)
    merged = LearnerGroup.merge_metrics(per_rank)
    toks = [r0["learner/tokens"], r1["learner/tokens"]]
    for key in r0:  # the old merge, by hand
        how, vals = _table_reduction(key), [r0[key], r1.get(key, 0.0)]
        want = {Reduce.SUM: sum(vals), Reduce.FIRST: vals[0], Reduce.MAX: max(vals),
                Reduce.TOKEN_MEAN: sum(v * t for v, t in zip(vals, toks)) / max(sum(toks), 1.0)}[how]
        assert r0.reductions[key] is how, key
        assert merged[key] == pytest.approx(want, rel=1e-12), key
