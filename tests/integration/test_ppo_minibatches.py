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
                          "seed=3")
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
