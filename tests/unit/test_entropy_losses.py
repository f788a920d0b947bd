"""Clip-Cov, KL-Cov, BAPO and high-entropy token selection (`learner.entropy_losses`, `learner.loss_core`)
against values computed by hand on tiny tensors; the arithmetic is written out beside each expected number."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from learner.entropy_losses import (BapoLossConfig, ClipCovLossConfig, KlCovLossConfig, bapo_bounds, clip_cov_loss,
                                    kl_cov_loss, token_covariance)
from learner.loss_core import PolicyLossInput, high_entropy_selection
from learner.losses import POLICY_LOSSES, PpoTisLossConfig, policy_loss
from learner.metrics import token_quantiles
from orchestrator.config import load_config


def _inp(logprobs, prox, beh, adv, mask=None, entropy=None):
    lp = torch.tensor(logprobs, dtype=torch.float64).requires_grad_(True)
    mask = torch.ones_like(lp) if mask is None else torch.tensor(mask, dtype=torch.float64)
    ent = None if entropy is None else torch.tensor(entropy, dtype=torch.float64)
    return PolicyLossInput(lp, torch.tensor(prox, dtype=torch.float64), torch.tensor(beh, dtype=torch.float64),
                           torch.tensor(adv, dtype=torch.float64), mask, entropy=ent)


def test_token_covariance_is_centred_over_trained_tokens():
    # trained: logp -1, -3, -2 (mean -2) and A 1, 1, -1 (mean 1/3): (1)(2/3), (-1)(2/3), (0)(-4/3); masked: 0
    inp = _inp([[-1.0, -3.0], [-2.0, -7.0]], [[0.0] * 2] * 2, [[0.0] * 2] * 2, [1.0, -1.0], mask=[[1, 1], [1, 0]])
    assert torch.allclose(token_covariance(inp), torch.tensor([[2 / 3, -2 / 3], [0.0, 0.0]], dtype=torch.float64))


def test_clip_cov_removes_the_token_in_the_band_and_keeps_the_tis_weights():
    # logp [[-0.5, -3], [-2.25, -2.25]] (mean -2), A [+2, -2] (token mean 0):
    # cov = [[1.5 * 2, -1 * 2], [-0.25 * -2, -0.25 * -2]] = [[3, -2], [0.5, 0.5]]: only (0, 0) is in (1, 5)
    lp = [[-0.5, -3.0], [-2.25, -2.25]]
    beh = [[-0.5, -3.5], [-2.25 - math.log(4.0), -2.25]]  # pi_prox/pi_behav: 1, e^0.5, 4 (capped at 2), 1
    inp = _inp(lp, lp, beh, [2.0, -2.0])
    loss, m = clip_cov_loss(inp, ClipCovLossConfig())  # int(2e-4 * 4) = 0 -> at least one token
    # ratio pi_theta/pi_prox = 1: loss_t = -A w_t; (0, 0) removed; (0, 1) -2 e^0.5; (1, 0) 2 * 2; (1, 1) 2 * 1
    assert loss.item() == pytest.approx((-2 * math.exp(0.5) + 4 + 2) / 4, rel=1e-12)
    loss.backward()
    want = torch.tensor([[0.0, -2 * math.exp(0.5) / 4], [2 * 2 / 4, 2 / 4]], dtype=torch.float64)
    assert torch.allclose(inp.logprobs.grad, want, atol=1e-12)
    assert m["learner/cov_clipped_frac"] == pytest.approx(1 / 4)
    assert m["learner/cov_mean"] == pytest.approx((3 - 2 + 0.5 + 0.5) / 4)
    assert m["learner/cov_max"] == pytest.approx(3.0)
    assert m["off_policy/is_truncated_frac"] == pytest.approx(1 / 4) and m["learner/pg_clipfrac"] == 0.0
    # a band above 3 holds no token: plain ppo_tis, (0, 0) contributes -2
    loss2, m2 = clip_cov_loss(_inp(lp, lp, beh, [2.0, -2.0]), ClipCovLossConfig(clip_cov_lb=3.5))
    assert loss2.item() == pytest.approx((-2 - 2 * math.exp(0.5) + 4 + 2) / 4, rel=1e-12)
    assert m2["learner/cov_clipped_frac"] == 0.0


def test_clip_cov_draws_its_share_of_the_band_at_random():
    # logp -1 (A +1) and -5 (A -1), mean -3: cov = (+-2)(+-1) = 2 for all 8 tokens, all in (1, 5);
    # int(0.25 * 8) = 2 of them lose their gradient (d loss / d logp_t = -A_t / 8 for the others)
    lp = [[-1.0] * 4, [-5.0] * 4]
    removed = set()
    for seed in range(6):
        torch.manual_seed(seed)
        inp = _inp(lp, lp, lp, [1.0, -1.0])
        loss, m = clip_cov_loss(inp, ClipCovLossConfig(clip_cov_ratio=0.25))
        loss.backward()
        zero = (inp.logprobs.grad == 0).nonzero().tolist()
        assert len(zero) == 2 and m["learner/cov_clipped_frac"] == pytest.approx(2 / 8)
        others = inp.logprobs.grad[inp.logprobs.grad != 0]
        assert set(others.abs().tolist()) == {1 / 8}
        removed.update(map(tuple, zero))
    assert len(removed) > 2  # a random draw, not always the same tokens


def test_kl_cov_penalises_the_top_covariance_token_without_clipping():
    # logp [[-0.5, -2], [-2, -1.5]] (mean -1.5), A [+1, -1]: cov = [[1, -0.5], [0.5, 0]]; top int(0.25 * 4) = 1: (0, 0)
    lp, prox = [[-0.5, -2.0], [-2.0, -1.5]], [[-1.0, -2.0], [-2.0, -2.0]]
    beh = [[-1.0, -2.0], [-2.0 - math.log(4.0), -2.0]]  # pi_prox/pi_behav = 4 at (1, 0): weight capped at 2
    inp = _inp(lp, prox, beh, [1.0, -1.0])
    loss, m = kl_cov_loss(inp, KlCovLossConfig(kl_cov_ratio=0.25, kl_cov_coef=1.0))
    # r = e^0.5, 1, 1, e^0.5; loss_t = w (-A r + |logp - prox| on (0, 0)):
    # (0, 0) -e^0.5 + 0.5; (0, 1) -1; (1, 0) 2 * 1; (1, 1) e^0.5 (r = 1.65 > 1.28 would be clipped by PPO for A > 0
    # at (0, 0): KL-Cov has no clip)
    assert loss.item() == pytest.approx((-math.exp(0.5) + 0.5 - 1 + 2 + math.exp(0.5)) / 4, rel=1e-12)
    loss.backward()
    want = torch.tensor([[(-math.exp(0.5) + 1) / 4, -1 / 4], [2 / 4, math.exp(0.5) / 4]], dtype=torch.float64)
    assert torch.allclose(inp.logprobs.grad, want, atol=1e-12)
    assert m["learner/cov_kl_frac"] == pytest.approx(1 / 4) and m["learner/cov_kl"] == pytest.approx(0.5 / 4)
    assert m["learner/cov_mean"] == pytest.approx((1 - 0.5 + 0.5 + 0) / 4) and m["learner/cov_max"] == 1.0
    assert m["off_policy/is_truncated_frac"] == pytest.approx(1 / 4)


_BAPO = dict(ratio_low_start=0.6, ratio_low_max=0.9, ratio_low_step=0.1, ratio_high_start=1.2, ratio_high_max=1.5,
             ratio_high_step=0.1)
# seq 0: A = +1, r = 1.0, 1.35; seq 1: A = -1, r = 0.75, 1.0, 0.95. Gradient weights r |A| of unclipped tokens:
# (0.6, 1.2), (0.7, 1.3): P = 1.0 (1.35 clipped), N = 0.75 + 1 + 0.95 = 2.7 -> share 1 / 3.7 = 0.27
# (0.8, 1.4), (0.9, 1.5): P = 1 + 1.35 = 2.35, N = 1 + 0.95 = 1.95 (0.75 clipped) -> share 2.35 / 4.3 = 0.547
_R, _ADV, _MASK = [[1.0, 1.35, 1.0], [0.75, 1.0, 0.95]], [1.0, -1.0], [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("target, low, high, share", [(0.5, 0.8, 1.4, 2.35 / 4.3), (0.2, 0.6, 1.2, 1 / 3.7),
                                                      (0.6, 0.9, 1.5, 2.35 / 4.3)])  # 0.6: never reached
def test_bapo_bounds_move_up_until_the_positive_share_is_reached(target, low, high, share):
    cfg = BapoLossConfig(pos_share_target=target, **_BAPO)
    got = bapo_bounds(torch.tensor(_R), torch.tensor(_ADV), torch.tensor(_MASK), cfg)
    assert got == pytest.approx((low, high, share), rel=1e-6)


def test_bapo_loss_clips_pi_theta_over_pi_behav_at_the_chosen_bounds():
    lp = [[0.0] * 3, [0.0] * 3]
    beh = [[-math.log(r) for r in row] for row in _R]  # pi_theta/pi_behav = _R
    inp = _inp(lp, lp, beh, _ADV, mask=_MASK)
    loss, m = POLICY_LOSSES["bapo"](inp, BapoLossConfig(pos_share_target=0.5, **_BAPO))
    # bounds (0.8, 1.4): seq 0: -1.0, -1.35; seq 1: max(0.75, clip 0.8) = 0.8 (clipped), 1.0, 0.95; 5 tokens
    assert loss.item() == pytest.approx((-1.0 - 1.35 + 0.8 + 1.0 + 0.95) / 5, rel=1e-9)
    loss.backward()
    want = torch.tensor([[-1.0 / 5, -1.35 / 5, 0.0], [0.0, 1.0 / 5, 0.95 / 5]], dtype=torch.float64)
    assert torch.allclose(inp.logprobs.grad, want, atol=1e-9)
    assert (m["learner/bapo_clip_low"], m["learner/bapo_clip_high"]) == pytest.approx((0.8, 1.4))
    assert m["learner/bapo_pos_share"] == pytest.approx(2.35 / 4.3) and m["learner/pg_clipfrac"] == pytest.approx(0.2)


def test_high_entropy_selection_keeps_the_top_rho_of_trained_tokens():
    ent = torch.tensor([[0.1, 2.0, 0.5], [1.5, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the 9.0 is not trained: never selected
    # 5 trained tokens: rho 0.4 -> ceil(2) = 2 (2.0, 1.5); rho 0.5 -> ceil(2.5) = 3 (and 0.5)
    assert high_entropy_selection(ent, mask, 0.4).tolist() == [[0, 1, 0], [1, 0, 0]]
    assert high_entropy_selection(ent, mask, 0.5).tolist() == [[0, 1, 1], [1, 0, 0]]
    assert high_entropy_selection(torch.arange(15.0)[None], torch.ones(1, 15), 0.2).sum() == 3  # not 4
    assert high_entropy_selection(ent, torch.zeros_like(mask), 0.2).sum() == 0
    with pytest.raises(ValueError, match="token_selection_rho = 0"):
        high_entropy_selection(ent, mask, 0.0)


def test_token_selection_trains_only_the_selected_tokens_over_all_tokens():
    ent = [[0.1, 2.0, 0.5], [1.5, 0.3, 9.0]]
    z = [[0.0] * 3] * 2
    inp = _inp(z, z, z, [1.0, 2.0], mask=[[1, 1, 1], [1, 1, 0]], entropy=ent)
    loss, m = policy_loss(inp, PpoTisLossConfig(token_selection_rho=0.4))
    # selected (0, 1) with A = 1 and (1, 0) with A = 2; normaliser: all 5 trained tokens
    assert loss.item() == pytest.approx(-(1 + 2) / 5)
    assert m["learner/entropy_selected_frac"] == pytest.approx(2 / 5)
    loss.backward()
    assert torch.allclose(inp.logprobs.grad, torch.tensor([[0, -1 / 5, 0], [-2 / 5, 0, 0]], dtype=torch.float64))
    with pytest.raises(ValueError, match="token_selection_rho = 0.4 needs the policy's entropy"):
        policy_loss(_inp(z, z, z, [1.0, 2.0]), PpoTisLossConfig(token_selection_rho=0.4))


@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
def test_token_selection_composes_with_every_loss(name):
    ent = [[0.1, 2.0, 0.5], [1.5, 0.3, 0.2]]  # rho 1/3 of 6 tokens: (0, 1) and (1, 0)
    lp = [[-1.0, -0.5, -2.0], [-0.7, -1.2, -0.4]]
    inp = _inp(lp, lp, [[-1.1, -0.5, -2.0], [-0.7, -1.0, -0.4]], [1.0, -2.0], entropy=ent)
    cfg = POLICY_LOSSES[name].config(token_selection_rho=1 / 3)
    loss, m = POLICY_LOSSES[name](inp, cfg)
    loss.backward()
    unselected = torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    assert (inp.logprobs.grad[unselected] == 0).all(), name
    assert inp.logprobs.grad[~unselected].abs().min() > 0, name
    assert m["learner/entropy_selected_frac"] == pytest.approx(2 / 6)


def test_entropy_quantiles_on_trained_tokens():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # trained 1..5: linear interpolation at positions 0.4, 2, 3.6 -> 1.4, 3, 4.6 (the masked 100 is not seen)
    got = token_quantiles(v, mask, "learner/entropy")
    assert got == pytest.approx({"learner/entropy_p10": 1.4, "learner/entropy_p50": 3.0, "learner/entropy_p90": 4.6})
    assert token_quantiles(v, torch.zeros_like(mask), "x/e") == {"x/e_p10": 0.0, "x/e_p50": 0.0, "x/e_p90": 0.0}


def test_configs_load_and_refuse_bad_knobs(tmp_path):
    p = tmp_path / "run.toml"
    p.write_text('[learner.loss]\ntype = "bapo"\npos_share_target = 0.4\ntoken_selection_rho = 0.2\n')
    assert load_config(p).learner.loss == BapoLossConfig(pos_share_target=0.4, token_selection_rho=0.2)
    cfg = load_config(None, ["learner.loss=clip_cov", "learner.loss.clip_cov_ub=4.0"])
    assert cfg.learner.loss == ClipCovLossConfig(clip_cov_ub=4.0)
    assert load_config(None, ["learner.loss=kl_cov"]).learner.loss.kl_cov_ratio == 2e-3
    with pytest.raises(ValidationError, match="clip_cov_lb = 5 must be below clip_cov_ub = 5"):
        ClipCovLossConfig(clip_cov_lb=5.0)
    with pytest.raises(ValidationError, match="ratio_high_start = 2 is above ratio_high_max = 1.5"):
        BapoLossConfig(ratio_high_start=2.0, ratio_high_max=1.5)
