"""Shared prefix or padded rows, chosen per micro-batch by estimated forward cost (`learner.layout`): the shape
estimate equals the built layouts', the cost model picks shared prefix for short responses after a long prompt
and padded rows for long responses after a short prompt, and the learner's forward then really runs the
chosen layout with the same logprobs."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import LlamaConfig, Qwen3MoeConfig

from buffer import Sample
from learner import layout as layout_mod
from learner import step as step_mod
from learner.config import LearnerConfig
from learner.layout import (attention_pair_weight, forward_cost, layout_shape, padded_layout, shared_prefix_layout,
                            shared_prefix_pays)

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3)


def _group(prompt_len: int, response_len: int, k: int, pid: str = "p", seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    prompt = [rng.randrange(5, 250) for _ in range(prompt_len)]
    out = []
    for i in range(k):
        resp = [rng.randrange(5, 250) for _ in range(response_len)]
        out.append(Sample(pid, "g", prompt, resp, [-1.0] * response_len, [0] * response_len))
    return out


def test_layout_shape_equals_the_built_layouts():
    rng = random.Random(1)
    for trial in range(30):
        samples = []
        for g in range(rng.randint(1, 4)):
            samples += _group(rng.randint(1, 12), rng.randint(0, 9), rng.randint(1, 4), f"p{g}", seed=100 * trial + g)
        rng.shuffle(samples)
        row_tokens = rng.choice([0, 8, 20, 64])
        assert layout_shape(samples, True, row_tokens) == tuple(shared_prefix_layout(samples, row_tokens).input_ids.shape)
        assert layout_shape(samples, False) == tuple(padded_layout(samples).input_ids.shape)


def test_pair_weight_from_the_config_dims():
    d, h, kv, hd, ff = 576, 9, 3, 64, 1536
    expected = 4 * h * hd / (2 * (d * hd * (2 * h + 2 * kv) + 3 * d * ff))
    assert attention_pair_weight(LlamaConfig(**SMOLLM2_135M)) == pytest.approx(expected)
    moe = Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         moe_intermediate_size=32, num_experts_per_tok=2, intermediate_size=999)
    assert attention_pair_weight(moe) == pytest.approx(4 * 4 * 16 / (2 * (64 * 16 * 12 + 3 * 64 * 64)))


def test_cost_model_picks_shared_prefix_for_long_prompts_and_padded_rows_for_long_responses():
    w = attention_pair_weight(LlamaConfig(**SMOLLM2_135M))
    short = _group(256, 32, 8)  # measured on a 6-layer SmolLM2-135M-shaped model: shared prefix 0.51x padded
    long = _group(64, 1024, 8)  # same model: shared prefix 2.83x padded (one 8k-token row: 8x the attention)
    assert shared_prefix_pays(short, w)
    assert not shared_prefix_pays(long, w)
    shared, padded = (forward_cost(*layout_shape(long, s), w) for s in (True, False))
    assert shared / padded == pytest.approx((1 * 8256 * (1 + w * 8256)) / (8 * 1088 * (1 + w * 1088)))
    # packing several short blocks into one row stays cheap; one group per row is what packing adds to
    many = [s for g in range(4) for s in _group(200, 8, 4, f"p{g}", seed=g)]
    assert shared_prefix_pays(many, w, row_tokens=1024)


def test_default_config_chooses_by_cost():
    assert LearnerConfig().shared_prefix and LearnerConfig().shared_prefix_by_cost


@pytest.mark.parametrize("long_responses", [False, True])
def test_forward_by_cost_runs_the_chosen_layout_with_the_same_logprobs(tiny_model, monkeypatch, long_responses):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa")
    samples = _group(3, 60, 4) if long_responses else _group(40, 2, 4)
    w = attention_pair_weight(model.config)
    assert shared_prefix_pays(samples, w) is not long_responses  # the tiny model's dims put these on either side
    built = []
    for name in ("padded_layout", "shared_prefix_layout"):
        real = getattr(layout_mod, name)
        monkeypatch.setattr(step_mod, name, lambda *a, _real=real, _name=name: built.append(_name) or _real(*a))
    got, mask = step_mod.response_logprobs(model, samples, "cpu", 0.7, shared_prefix=True, by_cost=True)
    assert built == ["padded_layout" if long_responses else "shared_prefix_layout"]
    ref, _ = step_mod.response_logprobs(model, samples, "cpu", 0.7, shared_prefix=False)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    built.clear()
    step_mod.response_logprobs(model, samples, "cpu", 0.7, shared_prefix=True)  # by_cost off: always shared
    assert built == ["shared_prefix_layout"]
