import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.losses import ppo_clip_tis_loss


def test_tis_weights_and_loss_hand_computed():
    old = torch.tensor([[-1.0, -2.0, -0.5]])
    logprobs = old.clone().requires_grad_(True)
    # behaviour such that pi_learner / pi_behaviour = 1, e^0.5, 4 (truncated to the cap 2)
    beh = torch.tensor([[-1.0, -2.5, -0.5 - math.log(4.0)]])
    loss, m = ppo_clip_tis_loss(logprobs, old, beh, torch.tensor([2.0]), torch.ones(1, 3), tis_cap=2.0)
    w = [1.0, math.exp(0.5), 2.0]
    assert loss.item() == pytest.approx(-2.0 * sum(w) / 3, rel=1e-5)
    assert m["off_policy/is_weight_mean"] == pytest.approx(sum(w) / 3, rel=1e-5)
    assert m["off_policy/is_truncated_frac"] == pytest.approx(1 / 3)
    k3 = [0.0, math.exp(0.5) - 1 - 0.5, 4 - 1 - math.log(4)]
    assert m["off_policy/mismatch_kl"] == pytest.approx(sum(k3) / 3, rel=1e-5)
    loss.backward()
    # d loss / d logprob_t = -A * w_t * ratio / n_tokens
    assert torch.allclose(logprobs.grad, torch.tensor([[-2 * x / 3 for x in w]]), atol=1e-6)


def test_ppo_clip_positive_and_negative_advantage():
    old = torch.zeros(2, 1)
    logprobs = (old + math.log(1.5)).requires_grad_(True)
    loss, m = ppo_clip_tis_loss(logprobs, old, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1),
                                clip_low=0.2, clip_high=0.2)
    # A=+1: max(-1.5, -1.2) = -1.2 (clipped, no grad); A=-1: max(1.5, 1.2) = 1.5 (unclipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2, rel=1e-5)
    assert m["learner/pg_clipfrac"] == pytest.approx(0.5)
    loss.backward()
    assert logprobs.grad[0, 0].item() == 0.0
    assert logprobs.grad[1, 0].item() == pytest.approx(1.5 / 2, rel=1e-5)


def test_masked_tokens_and_empty_response_do_not_contribute():
    old = torch.tensor([[-1.0, -1e4], [0.0, 0.0]])
    beh = torch.tensor([[-1.0, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # second sample: zero-length response
    loss, m = ppo_clip_tis_loss(old.clone(), old, beh, torch.tensor([1.0, 5.0]), mask)
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-1.0)
    assert all(math.isfinite(v) for v in m.values())


def test_loss_normalizer_and_kl_term():
    lp = torch.zeros(1, 2)
    ref = torch.full((1, 2), math.log(2.0))
    loss, _ = ppo_clip_tis_loss(lp, lp, lp, torch.tensor([0.0]), torch.ones(1, 2), loss_normalizer=4.0,
                                ref_logprobs=ref, kl_coef=0.5)
    # k3 = e^d - d - 1 with d = log 2 -> 1 - log 2 per token; sum 2 tokens / 4 * 0.5
    assert loss.item() == pytest.approx(0.5 * 2 * (1 - math.log(2)) / 4, rel=1e-5)


def test_bad_inputs_raise():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="shapes differ"):
        ppo_clip_tis_loss(x, torch.zeros(1, 3), x, torch.zeros(1), x)
    with pytest.raises(ValueError, match="tis_cap"):
        ppo_clip_tis_loss(x, x, x, torch.zeros(1), x, tis_cap=0.0)
    with pytest.raises(ValueError, match="ref_logprobs"):
        ppo_clip_tis_loss(x, x, x, torch.zeros(1), x, kl_coef=0.1)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-50, 0), min_size=3, max_size=3),
    st.lists(st.floats(-50, 0), min_size=3, max_size=3),
    st.floats(-10, 10),
    st.floats(0.1, 10),
)
def test_weights_within_band_and_finite(old, beh, adv, cap):
    old_t, beh_t = torch.tensor([old]), torch.tensor([beh])
    loss, m = ppo_clip_tis_loss(old_t, old_t, beh_t, torch.tensor([adv]), torch.ones(1, 3), tis_cap=cap)
    assert math.isfinite(loss.item())
    assert 0.0 <= m["off_policy/is_weight_mean"] <= cap + 1e-5
    assert 0.0 <= m["off_policy/is_truncated_frac"] <= 1.0
    assert m["off_policy/mismatch_kl"] >= -1e-6
