"""Several optimizer steps per batch: pi_prox after the first minibatch is the pre-step policy.

fp32 rollouts and learner, on-policy data (max_staleness 0): then pi_behav equals pi_prox (the
policy before the batch) up to ~1e-4 nats, and AReaL's log-linear approximation reduces to pi_behav
for on-policy tokens. So the recomputed pi_prox must agree with the approximation far more closely
than either agrees with the moving pi_theta; a pi_prox taken from the wrong policy would not.
"""

from __future__ import annotations

import json

import pytest

from orchestrator.loop import Trainer
from rollout.tasks import load_problems
from tiny_run import tiny_run_config

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_recomputed_prox_is_the_pre_step_policy(tiny_sums_model, ray_local, tmp_path):
    cfg = tiny_run_config(tiny_sums_model, tmp_path, "num_steps=2", "learner.micro_batch_size=4", "learner.lr=3e-3",
                          "buffer.max_staleness=0", "learner.ppo_minibatches=2", "learner.prox_logprobs=recompute",
                          "seed=3", "learner.skip_zero_advantage=false")  # prox metrics need trained samples
    t = Trainer(cfg, tmp_path / "run", tiny_sums_model, load_problems(cfg.data, "train"), [])
    try:
        t.run(progress=False)
    finally:
        t.shutdown()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    assert len(recs) == 2
    for r in recs:
        assert r["learner/optimizer_steps"] == 2
        # both measured on the second minibatch, after one optimizer step
        drift, err = r["learner/intra_batch_drift"], r["off_policy/prox_loglinear_abs_err"]
        print(f"drift {drift:.2e} nats/token, loglinear-vs-recompute error {err:.2e}")
        assert drift > 1e-2, r
        assert err < 1e-3 and err < drift / 10, r


@pytest.mark.timeout(600)
def test_zero3_ragged_batch_with_minibatches_keeps_ranks_in_lockstep(tiny_sums_model, ray_local, tmp_path):
    """13 samples on 2 ZeRO-3 ranks, 2 minibatches of micro-batches of 2: the ranks hold 7 and 6 samples,
    so a per-rank prox recompute would run 4 and 3 forwards. With every parameter partitioned (persistence
    threshold 0) each forward all-gathers, so unequal pass counts break the collective; the step must
    instead finish on both ranks with finite metrics. The LM head runs in chunks of 2 positions inside its
    one call per forward (shared prefix, the default), its weights gathered for forward and backward."""
    from buffer import Sample
    from learner import LearnerGroup
    from orchestrator.remote import wait_all

    cfg = tiny_run_config(tiny_sums_model, tmp_path, "learner.num_learners=2", "learner.num_cpus=0.5",
                          "learner.zero_stage=3", "learner.zero3_param_persistence_threshold=0",
                          "learner.ppo_minibatches=2", "learner.micro_batch_size=2", "learner.prox_logprobs=recompute",
                          "learner.step_timeout_s=120", "learner.logit_chunk_tokens=2")
    group = LearnerGroup(cfg.learner, tiny_sums_model, [None, None], cfg.samples_per_step, cfg.rollout.max_tokens,
                         cfg.rollout.temperature, cfg.seed)
    batch = [[Sample(f"p{g}", f"g{g}", [1, 5, 7], [9, 11, 2], [-2.0] * 3, [0] * 3, reward=float((g + i) % 2))
              for i in range(n)] for g, n in enumerate([5, 4, 4])]
    try:
        per_rank = wait_all(group.train_step_remote(ray_local.put(batch), 0), 300, "ragged ZeRO-3 step")
    finally:
        for r in group.ranks:
            ray_local.kill(r)
    m = group.merge_metrics(per_rank)
    assert m["learner/samples"] == 13 and m["learner/optimizer_steps"] == 2.0
    assert m["learner/skipped_steps"] == 0.0 and m["learner/grad_norm"] > 0
