"""The tiny random decoder configs of the model conformance matrix, one per family users bring to RL, each with
the feature that family adds made to matter at a few tokens: sliding windows of 4 tokens, post-head logit scales
far from 1, soft-caps close to the logits' size, MoE routers, a state-space hybrid. Built from transformers
configs (no download).

Used by the learner's matrix (tests/unit/test_model_conformance.py) and by the engine's
(`tooling.engine_conformance`).
"""

from __future__ import annotations

BASE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.1,
            tie_word_embeddings=False, pad_token_id=0)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, output_router_logits=True,
           router_aux_loss_coef=0.5)
ARCHS = {  # name -> (model_type, config overrides)
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen2_sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),  # layer 1 slides
    "qwen3": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", dict(MOE, decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("olmoe", dict(MOE)),
    "mistral_sliding": ("mistral", dict(sliding_window=4)),
    "gemma2": ("gemma2", dict(sliding_window=4, final_logit_softcapping=0.5, attn_logit_softcapping=5.0,
                              query_pre_attn_scalar=16)),
    "gemma3": ("gemma3_text", dict(sliding_window=4, sliding_window_pattern=2, final_logit_softcapping=0.5,
                                   query_pre_attn_scalar=16)),
    "phi3": ("phi3", dict(sliding_window=5)),
    "granite": ("granite", dict(logits_scaling=8.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                attention_multiplier=0.25)),
    "hyperclovax": ("hyperclovax", dict(logits_scaling=0.25)),  # multiplies by logits_scaling, Granite divides
    "cohere": ("cohere", dict(logit_scale=0.25)),
    "cohere2": ("cohere2", dict(logit_scale=0.25, sliding_window=4, sliding_window_pattern=2)),
    "olmo2": ("olmo2", {}),
    "smollm3": ("smollm3", dict(use_sliding_window=True, sliding_window=4, no_rope_layer_interval=2)),
    "gpt_oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                                output_router_logits=True)),
    "falcon_h1": ("falcon_h1", dict(lm_head_multiplier=0.5, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                                    mamba_d_state=16, mamba_chunk_size=8)),
}


def build_config(arch: str, **overrides):
    """The transformers config of ``arch`` (a key of `ARCHS`) with ``overrides`` on top of `BASE`.

    Raises:
        KeyError: ``arch`` is not in `ARCHS`.
    """
    from transformers import CONFIG_MAPPING

    model_type, over = ARCHS[arch]
    return CONFIG_MAPPING[model_type](**{**BASE, **overrides, **over})
