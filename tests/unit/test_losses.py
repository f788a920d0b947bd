import inspect
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learner.losses import (POLICY_LOSSES, IcepopLossConfig, PolicyLossInput, PpoLossConfig, PpoSeqTisLossConfig,
                            PpoTisLossConfig, SeqMaskLossConfig, k3_kl_penalty, policy_loss, ppo_tis_loss)


def _inp(logprobs, prox, beh, adv, mask=None, normalizer=None):
    lp = torch.tensor(logprobs).requires_grad_(True)
    mask = torch.ones_like(lp) if mask is None else torch.tensor(mask)
    return PolicyLossInput(lp, torch.tensor(prox), torch.tensor(beh), torch.tensor(adv), mask, normalizer)


def test_token_tis_weights_and_loss_hand_computed():
    # pi_prox / pi_behav = 1, e^0.5, 4 (truncated to the cap 2); ratio pi_theta/pi_prox = 1
    inp = _inp([[-1.0, -2.0, -0.5]], [[-1.0, -2.0, -0.5]], [[-1.0, -2.5, -0.5 - math.log(4.0)]], [2.0])
    loss, m = ppo_tis_loss(inp, PpoTisLossConfig(tis_cap=2.0))
    w = [1.0, math.exp(0.5), 2.0]
    assert loss.item() == pytest.approx(-2.0 * sum(w) / 3, rel=1e-5)
    assert m["off_policy/is_weight_mean"] == pytest.approx(sum(w) / 3, rel=1e-5)
    assert m["off_policy/is_truncated_frac"] == pytest.approx(1 / 3)
    k3 = [0.0, math.exp(0.5) - 1 - 0.5, 4 - 1 - math.log(4)]
    assert m["off_policy/mismatch_kl"] == pytest.approx(sum(k3) / 3, rel=1e-5)
    loss.backward()
    # d loss / d logprob_t = -A * w_t * ratio / n_tokens
    assert torch.allclose(inp.logprobs.grad, torch.tensor([[-2 * x / 3 for x in w]]), atol=1e-6)


def test_sequence_tis_uses_one_weight_per_sequence():
    # per-token log ratios 0.5 and 0.25 -> sequence weight e^0.75 = 2.117, truncated to 2
    inp = _inp([[0.0, 0.0]], [[0.0, 0.0]], [[-0.5, -0.25]], [1.0])
    loss, m = POLICY_LOSSES["ppo_seq_tis"](inp, PpoSeqTisLossConfig(tis_cap=2.0))
    assert loss.item() == pytest.approx(-2.0, rel=1e-5)
    assert m["off_policy/is_truncated_frac"] == 1.0
    loss2, _ = POLICY_LOSSES["ppo_seq_tis"](inp, PpoSeqTisLossConfig(tis_cap=5.0))
    assert loss2.item() == pytest.approx(-math.exp(0.75), rel=1e-5)


def test_ppo_clip_positive_and_negative_advantage():
    r = math.log(1.5)
    inp = _inp([[r], [r]], [[0.0], [0.0]], [[0.0], [0.0]], [1.0, -1.0])
    loss, m = POLICY_LOSSES["ppo"](inp, PpoLossConfig(clip_low=0.2, clip_high=0.2))
    # A=+1: max(-1.5, -1.2) = -1.2 (clipped, no grad); A=-1: max(1.5, 1.2) = 1.5 (unclipped)
    assert loss.item() == pytest.approx((-1.2 + 1.5) / 2, rel=1e-5)
    assert m["learner/pg_clipfrac"] == pytest.approx(0.5)
    loss.backward()
    assert inp.logprobs.grad[0, 0].item() == 0.0
    assert inp.logprobs.grad[1, 0].item() == pytest.approx(1.5 / 2, rel=1e-5)


def test_icepop_masks_tokens_outside_the_band():
    # ratios pi_prox/pi_behav: 1 (kept), e^1 = 2.72 (masked), e^-1 = 0.37 (masked)
    inp = _inp([[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]], [[0.0, -1.0, 1.0]], [1.0])
    loss, m = POLICY_LOSSES["icepop"](inp, IcepopLossConfig(band_low=0.5, band_high=2.0))
    assert loss.item() == pytest.approx(-1.0 / 3, rel=1e-5)
    assert m["off_policy/masked_frac"] == pytest.approx(2 / 3)


def test_seq_mask_drops_whole_sequences_by_geometric_mean():
    # seq 1 geo-mean exp((1 + 0.2)/2) = 1.82 (kept); seq 2 exp((1 + 1)/2) = 2.72 (dropped)
    inp = _inp([[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]], [[-1.0, -0.2], [-1.0, -1.0]], [1.0, 1.0])
    loss, m = policy_loss(inp, SeqMaskLossConfig(band_low=0.5, band_high=2.0))
    assert loss.item() == pytest.approx(-2.0 / 4, rel=1e-5)
    assert m["off_policy/masked_frac"] == pytest.approx(0.5)


def test_gspo_sequence_ratio_and_clip():
    # mean log ratio over 2 tokens = 0.1 -> s = e^0.1 = 1.105 > 1 + 4e-4: clipped for A > 0
    inp = _inp([[0.1, 0.1]], [[0.0, 0.0]], [[0.0, 0.0]], [1.0])
    loss, m = POLICY_LOSSES["gspo"](inp)
    assert loss.item() == pytest.approx(-(1 + 4e-4), rel=1e-6)
    assert m["learner/pg_clipfrac"] == 1.0
    loss.backward()
    assert inp.logprobs.grad.abs().max().item() == 0.0
    inp2 = _inp([[0.1, 0.1]], [[0.1, 0.1]], [[0.1, 0.1]], [1.0])  # s = 1: unclipped, grad -A s / (B*T)
    loss2, _ = POLICY_LOSSES["gspo"](inp2)
    loss2.backward()
    assert torch.allclose(inp2.logprobs.grad, torch.full((1, 2), -0.5))


def test_topr_positive_reinforce_negative_truncated():
    # seq 1: A=+1 -> weight 1; seq 2: A=-1 with pi_prox/pi_behav = e^-1 -> weight 0.368; seq 3: ratio e^2 -> 1
    inp = _inp([[-1.0], [-1.0], [-1.0]], [[-1.0], [-1.0], [-1.0]], [[-1.0], [0.0], [-3.0]], [1.0, -1.0, -1.0])
    loss, m = POLICY_LOSSES["topr"](inp)
    w2 = math.exp(-1.0)
    # loss_t = -w A log pi: seq1 -(1)(1)(-1) = 1; seq2 -(w2)(-1)(-1) = -w2; seq3 -(1)(-1)(-1) = -1
    assert loss.item() == pytest.approx((1 - w2 - 1) / 3, rel=1e-5)
    loss.backward()
    assert torch.allclose(inp.logprobs.grad, torch.tensor([[-1 / 3], [w2 / 3], [1 / 3]]), atol=1e-6)


def test_masked_tokens_and_empty_responses_do_not_contribute():
    inp = _inp([[-1.0, -1e4], [0.0, 0.0]], [[-1.0, -1e4], [0.0, 0.0]], [[-1.0, 0.0], [0.0, 0.0]], [1.0, 5.0],
               mask=[[1.0, 0.0], [0.0, 0.0]])
    for name, fn in POLICY_LOSSES.items():
        loss, m = fn(inp)
        assert torch.isfinite(loss), name
        assert all(math.isfinite(v) for v in m.values()), name


def test_every_loss_takes_its_own_config_and_nothing_else():
    for name, entry in POLICY_LOSSES.items():
        assert entry.config.model_fields["type"].default == name
        assert list(inspect.signature(entry.fn).parameters) == ["inp", "cfg"], name
        assert all(info.description for f, info in entry.config.model_fields.items() if f != "type"), name
    inp = _inp([[0.0]], [[0.0]], [[0.0]], [1.0])
    with pytest.raises(TypeError, match="gspo_loss takes a GspoLossConfig, got a PpoTisLossConfig"):
        POLICY_LOSSES["gspo"](inp, PpoTisLossConfig())


def test_kl_penalty_and_normalizer():
    lp = torch.zeros(1, 2)
    pen, mean = k3_kl_penalty(lp, torch.full((1, 2), math.log(2.0)), torch.ones(1, 2), loss_normalizer=4.0)
    # k3 = e^d - d - 1 with d = log 2 -> 1 - log 2 per token; sum over 2 tokens / 4
    assert pen.item() == pytest.approx(2 * (1 - math.log(2)) / 4, rel=1e-5)
    assert mean == pytest.approx(1 - math.log(2), rel=1e-5)


def test_bad_inputs_raise():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="share one shape"):
        PolicyLossInput(x, torch.zeros(1, 3), x, torch.zeros(1), x)
    with pytest.raises(ValueError, match="advantages"):
        PolicyLossInput(x, x, x, torch.zeros(2), x)
    inp = PolicyLossInput(x, x, x, torch.zeros(1), x)
    with pytest.raises(ValueError, match="tis_cap"):
        ppo_tis_loss(inp, PpoTisLossConfig(tis_cap=0.0))
    with pytest.raises(ValueError, match="band"):
        POLICY_LOSSES["icepop"](inp, IcepopLossConfig(band_low=1.5, band_high=2.0))


_logp = st.lists(st.floats(-50, 0), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(_logp, _logp, st.floats(-10, 10), st.floats(0.1, 10), st.sampled_from(sorted(POLICY_LOSSES)))
def test_bounds_hold_for_every_variant(prox, beh, adv, cap, name):
    inp = _inp([prox], [prox], [beh], [adv])
    entry = POLICY_LOSSES[name]
    loss, m = entry(inp, entry.config(**({"tis_cap": cap} if "tis_cap" in entry.config.model_fields else {})))
    assert math.isfinite(loss.item())
    if name in ("ppo_tis", "ppo_seq_tis", "gspo"):
        assert 0.0 <= m["off_policy/is_weight_mean"] <= cap + 1e-5
    if name == "topr":
        assert 0.0 <= m["off_policy/is_weight_mean"] <= 1.0 + 1e-6
    assert 0.0 <= m["off_policy/masked_frac"] <= 1.0
    assert m["off_policy/mismatch_kl"] >= -1e-6
