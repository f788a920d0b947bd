import pytest
import torch

from learner.advantages import (ADVANTAGE_ESTIMATORS, GrpoAdvantageConfig, batch_advantages,
                                reinforce_pp_baseline_advantages, rloo_advantages, spo_advantages)


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


# ---- samples whose reward function failed ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ADVANTAGE_ESTIMATORS))
def test_failed_samples_are_left_out_of_the_statistics(name):
    # group 1 is [1, 0 (failed), 0, 1]: its baseline comes from [1, 0, 1]; group 3 failed entirely
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0]]
    baselines = [[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2], [0.7, 0.7]]
    valid = [[True, False, True, True], [True, True, True], [False, False]]
    adv, _ = batch_advantages(name, rewards, baselines, valid)
    ref, _ = batch_advantages(name, [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], [[0.5, 0.5, 0.5], [0.2, 0.2, 0.2]])
    assert adv == pytest.approx([ref[0], 0.0, ref[1], ref[2], *ref[3:], 0.0, 0.0], abs=1e-6)
    assert any(abs(a) > 0.1 for a in adv)


@pytest.mark.parametrize("name", ["grpo", "drgrpo", "rloo", "reinforce_pp"])
def test_a_group_with_one_valid_sample_has_no_baseline(name):
    adv, _ = batch_advantages(name, [[1.0, 0.0], [1.0, 0.0]], valid=[[True, False], [True, True]])
    assert torch.isfinite(torch.tensor(adv)).all()
    assert adv[:2] == [0.0, 0.0] and adv[2] > 0 > adv[3]
    with pytest.raises(ValueError, match="group of 1"):  # a real group of 1 is still a configuration error
        batch_advantages(name, [[1.0, 0.0], [1.0]], valid=[[True, True], [True]])


# ---- each estimator's config ------------------------------------------------------------------------------

def test_each_estimator_has_its_config_and_eps_reaches_the_formula():
    for name, entry in ADVANTAGE_ESTIMATORS.items():
        assert entry.config.model_fields["type"].default == name
    # rewards [1, 0]: mean 0.5, unbiased std sqrt(0.5) -> A = +-0.5 / (sqrt(0.5) + eps)
    adv, _ = batch_advantages(GrpoAdvantageConfig(eps=1.0), [[1.0, 0.0]])
    assert adv == pytest.approx([0.5 / (0.5 ** 0.5 + 1.0), -0.5 / (0.5 ** 0.5 + 1.0)])
    assert batch_advantages("grpo", [[1.0, 0.0]])[0] == pytest.approx([0.5 / (0.5 ** 0.5 + 1e-6),
                                                                       -0.5 / (0.5 ** 0.5 + 1e-6)])
    with pytest.raises(TypeError, match="RlooAdvantageConfig got a GrpoAdvantageConfig"):
        ADVANTAGE_ESTIMATORS["rloo"](torch.ones(1, 2), cfg=GrpoAdvantageConfig())
