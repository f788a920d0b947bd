import math

import pytest
import torch

from learner.advantages import grpo_advantages


def test_grpo_hand_computed():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    adv, m = grpo_advantages(rewards)
    # group 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.5 / 0.57735 = +-0.866025
    expected = 0.5 / math.sqrt(1 / 3)
    assert torch.allclose(adv[0], torch.tensor([expected, -expected, -expected, expected]), atol=1e-5)
    # all-equal rewards: zero advantage, not NaN
    assert torch.equal(adv[1], torch.zeros(4))
    assert m["learner/zero_variance_group_frac"] == 0.5


def test_drgrpo_has_no_std_normalisation():
    adv, _ = grpo_advantages(torch.tensor([[3.0, 1.0]]), normalize_std=False)
    assert torch.allclose(adv, torch.tensor([[1.0, -1.0]]))


@pytest.mark.parametrize("bad", [torch.zeros(4), torch.zeros(2, 1)])
def test_bad_shapes_raise(bad):
    with pytest.raises(ValueError, match="group"):
        grpo_advantages(bad)
