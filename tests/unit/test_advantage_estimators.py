import pytest
import torch

from learner.advantages import ADVANTAGE_ESTIMATORS, reinforce_pp_baseline_advantages, rloo_advantages


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
    adv, m = ADVANTAGE_ESTIMATORS[name](torch.ones(3, 4))
    assert torch.isfinite(adv).all() and adv.abs().max() < 1e-4
    assert m["learner/zero_variance_group_frac"] == 1.0
