"""The pure pieces of a learner training step (`learner.step`), on hand-built Samples."""

from __future__ import annotations

import pytest
import torch

from buffer import Sample
from learner.advantages import SpoAdvantageConfig
from learner.batching import BatchShape, plan_microbatches, prox_schedule
from learner.step import (TokenWeightedMeans, batch_metrics, later_minibatch_prox, recompute_prox, response_logprobs,
                          step_advantages)


def _sample(reward: float, versions: list[int], status: str = "completed", **kw) -> Sample:
    r = len(versions)
    return Sample("p", "g", [1, 2], list(range(3, 3 + r)), [-1.0] * r, versions, reward=reward, status=status, **kw)


def test_step_advantages_scale_by_staleness_and_count_effective_samples():
    # group 1: GRPO advantages +-0.7071 (mean 0.5, unbiased std 0.7071); group 2: all equal -> 0
    batch = [[_sample(1.0, [3, 3]), _sample(0.0, [2, 3])], [_sample(1.0, [3]), _sample(1.0, [3])]]
    prep = step_advantages(batch, version=3, estimator="grpo", staleness_decay=0.5)
    a = 0.5 / 0.5 ** 0.5
    # the second sample's oldest token is one version behind: weight 0.5
    assert prep.advantages == pytest.approx([a, -a * 0.5, 0.0, 0.0], abs=1e-5)
    assert prep.weights.tolist() == [1.0, 0.5, 1.0, 1.0]
    assert prep.effective == 2
    assert prep.metrics["learner/zero_variance_group_frac"] == 0.5
    m = batch_metrics([s for g in batch for s in g], prep, with_rollout=True)
    assert m["curation/effective_samples"] == 2 and m["off_policy/sample_weight_mean"] == 0.875
    assert m["rollout/reward_mean"] == 0.75 and m["learner/samples"] == 4
    assert "rollout/reward_mean" not in batch_metrics([s for g in batch for s in g], prep, with_rollout=False)


def test_spo_without_baselines_is_refused():
    with pytest.raises(ValueError, match="value_tracker"):
        step_advantages([[_sample(1.0, [0]), _sample(0.0, [0])]], 0, "spo", 1.0)
    with pytest.raises(ValueError, match="value_tracker"):  # the config object, as learner.advantage holds it
        step_advantages([[_sample(1.0, [0]), _sample(0.0, [0])]], 0, SpoAdvantageConfig(), 1.0)


def test_token_weighted_means_average_each_key_over_the_passes_that_report_it():
    m = TokenWeightedMeans()
    m.add({"a": 1.0}, 3.0)
    m.add({"a": 3.0, "b": 2.0}, 1.0)
    assert m.means() == {"a": 1.5, "b": 2.0}
    assert m.total_tokens == 4.0


def test_later_minibatch_prox_uses_the_recomputed_values_and_reports_the_approximation_error():
    cur = torch.tensor([[-1.0, -2.0, 0.0]])
    beh = torch.tensor([[-1.5, -2.5, 0.0]])
    ver = torch.tensor([[3.0, 3.0, 3.0]])  # on-policy w.r.t. prox version 3: log-linear gives pi_behav
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    prox, m = later_minibatch_prox(cur, beh, ver, mask, 3, 0.5, None)
    assert torch.equal(prox, beh) and m == {"learner/intra_batch_drift": 0.5}
    prox, m = later_minibatch_prox(cur, beh, ver, mask, 3, 0.5, [torch.tensor([-1.25, -2.0])])
    assert prox.tolist() == [[-1.25, -2.0, 0.0]]
    assert m["off_policy/prox_loglinear_abs_err"] == pytest.approx((0.25 + 0.5) / 2)
    assert m["learner/intra_batch_drift"] == pytest.approx(0.25 / 2)


def test_a_failed_sample_gets_no_advantage_and_leaves_its_group_baseline_alone():
    # rewards [1, 0 (failed), 0, 1]: GRPO on [1, 0, 1] gives mean 2/3, std 0.57735
    batch = [[_sample(1.0, [0]), _sample(0.0, [0], "failed"), _sample(0.0, [0]), _sample(1.0, [0])]]
    prep = step_advantages(batch, 0, "grpo", 1.0)
    a, b = (1 - 2 / 3) / 3 ** -0.5, (0 - 2 / 3) / 3 ** -0.5
    assert prep.advantages == pytest.approx([a, 0.0, b, a], abs=1e-5)
    assert prep.effective == 3


def test_prox_padding_passes_run_a_forward_and_change_no_result(tiny_model):
    # 13 ragged samples over 2 ranks: rank 1 runs one padding pass; the tiny model stands in for the engine
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    samples = [Sample("p", "g", [1 + i % 3], [2 + (i * 7 + j) % 30 for j in range(1 + i % 4)], [-1.0] * (1 + i % 4),
                      [0] * (1 + i % 4)) for i in range(13)]
    calls = []

    def forward(mb):
        calls.append(len(mb))
        return response_logprobs(model, mb, "cpu", 0.7)[0]

    plan = plan_microbatches(BatchShape.singletons(13), 2, 2, 2)
    for rank in (0, 1):
        calls.clear()
        schedule = prox_schedule(plan, rank)
        got = recompute_prox(forward, samples, schedule)
        assert len(calls) == 4  # the same number of forward passes on both ranks
        mine = [i for mb in plan[rank] for m in mb for i in m]
        assert sorted(got) == sorted(mine)
        with torch.no_grad():
            for i in mine:  # each sample alone, no padding: the same logprobs
                alone = response_logprobs(model, [samples[i]], "cpu", 0.7)[0][0, : len(samples[i].response_ids)]
                assert torch.allclose(got[i], alone, atol=1e-6)


def test_logits_only_at_scored_positions_give_the_same_logprobs_and_gradients(tiny_model):
    """The LM head runs only at the positions that predict response tokens (padded layout): the logprobs
    and every parameter's gradient equal those from full logits (fp32, ragged prompts and responses).
    The shared-prefix layout has its own tests (test_shared_prefix.py)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    samples = [Sample("p", "g", [5, 6, 7, 8, 9][:n_p], [10 + j for j in range(n_r)], [-1.0] * n_r, [0] * n_r)
               for n_p, n_r in [(5, 3), (3, 6), (4, 1), (5, 4)]]

    def reference():  # the padded path with full-vocabulary logits at every position
        T = max(s.num_tokens for s in samples)
        ids = torch.zeros(len(samples), T, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(samples):
            ids[i, : s.num_tokens], attn[i, : s.num_tokens] = torch.tensor(s.prompt_ids + s.response_ids), 1
        logits = model(input_ids=ids, attention_mask=attn).logits.float() / 0.7
        return [torch.log_softmax(logits[i, len(s.prompt_ids) - 1: s.num_tokens - 1], -1)
                .gather(1, torch.tensor(s.response_ids)[:, None]).squeeze(1) for i, s in enumerate(samples)]

    def grads(total):
        model.zero_grad()
        total.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref = reference()
    g_ref = grads(sum((lp * (k + 1)).sum() for k, lp in enumerate(ref)))
    got, mask = response_logprobs(model, samples, "cpu", 0.7, shared_prefix=False)
    assert mask.sum() == sum(len(s.response_ids) for s in samples)
    for i, s in enumerate(samples):
        assert torch.allclose(got[i, : len(s.response_ids)], ref[i], rtol=1e-5, atol=1e-6)
    g_got = grads(sum((got[i, : len(s.response_ids)] * (i + 1)).sum() for i, s in enumerate(samples)))
    assert g_got.keys() == g_ref.keys()
    for n in g_ref:
        assert torch.allclose(g_got[n], g_ref[n], rtol=1e-5, atol=1e-7), n
