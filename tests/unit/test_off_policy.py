"""Hand-computed values for the learner's off-policy helpers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from learner.off_policy import loglinear_prox_logprobs, loss_normalizer, staleness_weights


def test_loglinear_interpolates_by_version():
    beh = torch.tensor([[-1.0, -2.0, -3.0]])
    cur = torch.tensor([[-0.5, -1.0, -3.5]])
    # tokens from versions 4 (on-policy w.r.t. prox 4), 3 and 2; pi_theta is at version 5
    ver = torch.tensor([[4.0, 3.0, 2.0]])
    out = loglinear_prox_logprobs(beh, cur, ver, prox_version=4, current_version=5)
    # alpha = (4-4)/(5-4) = 0; (4-3)/(5-3) = 1/2; (4-2)/(5-2) = 2/3
    expected = torch.tensor([[-1.0, -2.0 + 0.5 * 1.0, -3.0 + (2 / 3) * (-0.5)]])
    assert torch.allclose(out, expected)


def test_loglinear_fractional_current_version_and_equal_versions():
    beh, cur = torch.tensor([[-1.0, -1.0]]), torch.tensor([[-2.0, -2.0]])
    ver = torch.tensor([[3.0, 3.5]])
    out = loglinear_prox_logprobs(beh, cur, ver, prox_version=3, current_version=3.5)
    # first token: alpha 0 -> behaviour; second: v_behav == v_theta -> alpha 1 -> current
    assert out.tolist() == [[-1.0, -2.0]]


def test_loglinear_rejects_bad_input():
    t = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="current_version"):
        loglinear_prox_logprobs(t, t, t, prox_version=2, current_version=1)
    with pytest.raises(ValueError, match="shapes"):
        loglinear_prox_logprobs(t, torch.zeros(1, 3), t, 0, 1)


@given(st.lists(st.floats(-30, 0), min_size=1, max_size=8), st.lists(st.floats(-30, 0), min_size=1, max_size=8),
       st.integers(0, 8), st.floats(0, 3))
def test_loglinear_stays_between_behaviour_and_current(b, c, lag, ahead):
    n = min(len(b), len(c))
    beh, cur = torch.tensor([b[:n]]), torch.tensor([c[:n]])
    out = loglinear_prox_logprobs(beh, cur, torch.full((1, n), 10.0 - lag), 10, 10 + ahead)
    lo, hi = torch.minimum(beh, cur), torch.maximum(beh, cur)
    assert torch.isfinite(out).all()
    assert ((out >= lo - 1e-5) & (out <= hi + 1e-5)).all()


def test_staleness_weights():
    w = staleness_weights(torch.tensor([0, 1, 3]), 0.5)
    assert w.tolist() == [1.0, 0.5, 0.125]
    assert staleness_weights(torch.tensor([0, 7]), 1.0).tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="decay"):
        staleness_weights(torch.tensor([0]), 0.0)
    with pytest.raises(ValueError, match="staleness"):
        staleness_weights(torch.tensor([-1]), 0.9)


def test_loss_normalizer():
    assert loss_normalizer("token_mean", 37, 4, 48) == 37.0
    assert loss_normalizer("token_mean", 0, 4, 48) == 1.0  # all tokens masked: no division by zero
    assert loss_normalizer("constant", 37, 4, 48) == 192.0
    assert math.isclose(loss_normalizer("constant", 1, 0, 48), 48.0)
    with pytest.raises(ValueError, match="'seq_mean'"):
        loss_normalizer("seq_mean", 1, 1, 1)
