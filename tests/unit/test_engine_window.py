"""Cohere 2's sliding window: vLLM's sliding layers attend to ``sliding_window + 1`` tokens, transformers' (the
learner's) to ``sliding_window``; the rollout engine refuses such a model at start, in one line, whenever a
sequence can be longer than the window (`rollout.engine_args.check_window_convention`), and the gap it guards
against is real: one more key in the sliding layers changes the logprobs (transformers, tiny Cohere 2)."""

from __future__ import annotations

import json

import pytest
import torch

from rollout.engine_args import check_window_convention


def _dir(tmp_path, **config) -> str:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


@pytest.mark.parametrize("config", [
    dict(model_type="cohere2", sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    dict(model_type="cohere2", sliding_window=4, sliding_window_pattern=2),  # no layer_types: built from the pattern
    dict(model_type="cohere2_moe", sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
    dict(model_type="cohere2_vision", text_config=dict(model_type="cohere2", sliding_window=4,
                                                      layer_types=["sliding_attention", "full_attention"])),
])
def test_cohere2_longer_than_its_window_is_refused_in_one_line(tmp_path, config):
    path = _dir(tmp_path, **config)
    with pytest.raises(ValueError, match=r"'cohere2(_moe)?' has sliding_window = 4: .* 5 tokens .* to 4, .*"
                                         r"set rollout.max_model_len <= 4 \(it is 64\)") as err:
        check_window_convention(path, 64)
    assert "\n" not in str(err.value)
    check_window_convention(path, 4)  # no sequence reaches past the window: both see the same keys


@pytest.mark.parametrize("config", [
    dict(model_type="cohere2", sliding_window=4, layer_types=["full_attention", "full_attention"]),
    dict(model_type="cohere2", sliding_window=None),
    dict(model_type="mistral", sliding_window=4),  # vLLM windows it as transformers does (measured: match)
    dict(model_type="gemma3_text", sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
])
def test_models_both_sides_window_alike_are_accepted(tmp_path, config):
    check_window_convention(_dir(tmp_path, **config), 4096)


def test_the_engine_refuses_before_vllm_starts(tmp_path):
    from rollout.engine import VLLMEngine

    path = _dir(tmp_path, model_type="cohere2", sliding_window=4, sliding_window_pattern=2)
    with pytest.raises(ValueError, match="rollout.max_model_len <= 4"):
        VLLMEngine(path, max_model_len=64)


def test_one_more_key_in_the_sliding_layers_changes_the_logprobs():
    """What vLLM computes for Cohere 2 (sliding layers see ``q - k <= W``) is transformers' model with a window
    one larger; on sequences longer than the window the two differ far beyond fp32 noise."""
    from transformers import AutoModelForCausalLM

    from tooling.model_matrix import build_config

    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 40, 77, 114, 151, 188]])
    logprobs = []
    for window in (4, 5):
        config = build_config("cohere2", tie_word_embeddings=True)
        config.sliding_window = window
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()
        with torch.no_grad():
            logprobs.append(torch.log_softmax(model(ids).logits[0].float(), -1))
    gap = (logprobs[0] - logprobs[1]).abs().amax(-1)
    assert float(gap[:4].max()) < 1e-5  # within the window both see every earlier token
    assert float(gap[4:].max()) > 1e-2
