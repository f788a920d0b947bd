"""The one-core roofline of `tooling.generation_profile` (issue 33), by hand for SmolLM2-135M's shapes."""

from __future__ import annotations

import pytest

from tooling.generation_profile import roofline

# SmolLM2-135M-Instruct's config.json
SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "vocab_size": 49152, "intermediate_size": 1536,
           "num_attention_heads": 9, "num_key_value_heads": 3}


def test_roofline_counts_smollm2_by_hand():
    r = roofline(SMOLLM2, weight_bytes=269_030_016, prompts=200, prompt_tokens=24_400, gen_tokens=3_200)
    # per layer: q and o 576 x 576 each, k and v 576 x 192 each (3 KV heads x 64), MLP 3 x 576 x 1536
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536
    assert per_layer == 3_538_944
    # + the LM head; with the 30 x 2 + 1 RMSNorm weights of 576 this is the checkpoint's 134,515,008 parameters
    assert r["matmul_params"] == 30 * per_layer + 49152 * 576 == 134_515_008 - 61 * 576
    assert r["flops_per_token"] == 2 * r["matmul_params"]
    assert r["kv_bytes_per_token"] == 23040
    attn = 4 * 30 * 9 * 64  # QK^T and AV, per context position
    assert r["prefill_flops"] == pytest.approx(24_400 * (r["flops_per_token"] + attn * 122 / 2))
    assert r["decode_flops"] == pytest.approx(3_200 * (r["flops_per_token"] + attn * (122 + 16 / 2)))
    b = r["bound_s"]
    assert b["prefill_compute"] == pytest.approx(r["prefill_flops"] / 224e9)
    assert b["decode_weights_all_in_one_batch"] == pytest.approx(16 * 269_030_016 / 10e9)  # 16 steps of 200 seqs
    assert b["decode_weights_one_seq_at_a_time"] == pytest.approx(3_200 * 269_030_016 / 10e9)
