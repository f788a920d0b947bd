import pytest
import torch

from learner.advantages import ADVANTAGE_ESTIMATORS, reinforce_pp_baseline_advantages, rloo_advantages, spo_advantages


def test_rloo_hand_computed():
    # r = [1, 0, 0]: leave-one-out means are 0, 0.5, 0.5 -> A = [1, -0.5, -0.5]
    adv, _ = rloo_advantages(torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(adv, torch.tensor([[1.0, -0.5, -0.5]]))


def test_reinforce_pp_baseline_hand_computed():
    # centred: [[0.5, -0.5], [0, 0]] -> batch mean 0, unbiased std sqrt(0.5/3)
    adv, _ = reinforce_pp_baseline_advantages(torch.tensor([[1.0, 0.0], [2.0, 2.0]]))
    s = (0.5 / 3) ** 0.5
    assert torch.allclose(adv, torch.tensor([[0.5 / s, -0.5 / s], [0.0, 0.0]]), atol=1e-4)


@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_all_equal_rewards_give_zero_advantage(name):
    # SPO's baseline is the tracked value; a prompt whose value equals its rewards gives no signal
    adv, m = ADVANTAGE_ESTIMATORS[name](torch.ones(3, 4), torch.ones(3, 4))
    assert torch.isfinite(adv).all() and adv.abs().max() < 1e-4
    assert m["learner/zero_variance_group_frac"] == 1.0


def test_spo_hand_computed_and_single_sample_groups():
    # r - b = [0.5, -0.5, 0.2]; unbiased std of those = sqrt(((0.4)^2 + (0.6)^2 + (0.1)^2)/2) with mean 0.0667
    r, b = torch.tensor([[1.0], [0.0], [1.0]]), torch.tensor([[0.5], [0.5], [0.8]])
    adv, m = spo_advantages(r, b)
    d = torch.tensor([[0.5], [-0.5], [0.2]])
    assert torch.allclose(adv, d / d.std(unbiased=True), atol=1e-5)
    assert m["learner/zero_variance_group_frac"] == 0.0  # no group statistic for n = 1
    # an all-correct group still gets a positive signal when the prompt's value is below 1
    adv, m = spo_advantages(torch.ones(2, 2), torch.tensor([[0.5, 0.5], [0.9, 0.9]]))
    assert (adv > 0).all() and m["learner/zero_variance_group_frac"] == 1.0
    with pytest.raises(ValueError, match="share"):
        spo_advantages(torch.ones(2, 2), torch.ones(2, 1))
