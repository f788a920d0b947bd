"""Which model features the learner's scoring handles, how, and which it refuses at start.

The learner scores response tokens inside the LM head's own call (`learner.step.response_logprobs`) and,
with ``learner.shared_prefix``, runs one forward over a packed row under its own block attention mask
(`learner.layout.shared_prefix_layout`). Two kinds of model features touch that:

- **Logit transforms after the LM head** (`logit_transform`): Granite divides its logits by
  ``logits_scaling``, HyperCLOVA X multiplies by it, Cohere multiplies by ``logit_scale``, Falcon-H1 by
  ``lm_head_multiplier``, Gemma 2/3 soft-cap them (``tanh(logits / cap) * cap``). The scoring head applies
  the same transform before the softmax, so logprobs and entropy are those of the model's own logits
  (what the engine samples from); the model's forward then transforms the head's output again, which the
  learner ignores (it takes the head's output itself).
- **Sliding-window attention** (`block_masks`): a custom 4D mask reaches every layer as is, so the block
  mask carries the window itself: one mask when every layer slides (Mistral, Mixtral, Phi-3 with
  ``sliding_window``), a mask per layer type when full and sliding layers mix (Gemma 2/3, Cohere 2, Qwen 2/3
  and SmolLM3 with ``use_sliding_window``; transformers takes a dict keyed by layer type).

Mixture-of-experts models (Qwen3-MoE, OLMoE, Mixtral, ...): the router's logits and its auxiliary
load-balancing loss are not part of the RL loss (the forward is called without labels and with
``output_router_logits = False``); the router still gets the policy gradient through the weights of the
experts it picks, exactly as in a plain forward.

`check` refuses, with one line naming the feature and what to change, what the scoring cannot reproduce:
an unknown post-head transform, bidirectional attention, attention-score soft-capping (Gemma 2) under an
attention implementation that drops it (transformers' sdpa does; eager applies it), and, with
``learner.shared_prefix``, layers that are not attention (state-space / linear-attention hybrids: their
recurrence runs across a packed row) or an attention layer type other than full and sliding.

Left out on purpose: the attention kernels themselves (``learner.attn_implementation``, checked in
`learner.step`), and any runtime comparison with the rollout engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_DIVIDE_BY = {"logits_scaling": ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa",
                                 "granitemoe_swa")}
"""Config attribute -> model types whose forward divides the LM head's logits by it."""
_MULTIPLY_BY = {"logits_scaling": ("hyperclovax",), "logit_scale": ("cohere", "cohere2", "cohere2_moe"),
                "lm_head_multiplier": ("falcon_h1",)}
"""Config attribute -> model types whose forward multiplies the LM head's logits by it."""
_TRANSFORM_ATTRS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier",
                    "logit_multiplier", "logits_multiplier", "output_logits_scale")
"""Config attributes that rescale logits after the head in some family; refused on a model type not listed above."""

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
"""Layer types (``config.layer_types``) the shared-prefix block mask handles."""
_RECURRENT_HINTS = ("mamba", "ssm_", "linear_attn", "linear_num", "conv_kernel", "conv_L", "lru_")
"""Prefixes of config attributes of layers that are not attention (state-space, linear attention, convolution)."""


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the model's forward does to the LM head's logits, or None when it returns them as they are.

    Raises:
        ValueError: a logit transform this module does not know (`check`).
    """
    check_logits(config)
    config = _text_config(config)
    kind = config.model_type
    scale = 1.0
    for attr, types in _DIVIDE_BY.items():
        if kind in types and getattr(config, attr, None) not in (None, 1, 1.0):
            scale /= float(getattr(config, attr))
    for attr, types in _MULTIPLY_BY.items():
        if kind in types and getattr(config, attr, None) not in (None, 1, 1.0):
            scale *= float(getattr(config, attr))
    cap = getattr(config, "final_logit_softcapping", None)
    if scale == 1.0 and not cap:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        import torch

        if scale != 1.0:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def check_logits(config) -> None:
    """Refuse a model whose forward rescales the LM head's logits in a way `logit_transform` does not know.

    Raises:
        ValueError: naming the config attribute and the model type.
    """
    config = _text_config(config)
    known = {t for types in (*_DIVIDE_BY.values(), *_MULTIPLY_BY.values()) for t in types}
    for attr in _TRANSFORM_ATTRS:
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0) and config.model_type not in known:
            raise ValueError(f"model type {config.model_type!r} has {attr} = {value}, a logit transform after the "
                             "LM head the learner does not know; add it to learner.model_support or use another model")


def check(config, shared_prefix: bool, attn_implementation: str | None = None) -> None:
    """Refuse, with one line, a model whose response logprobs the learner's scoring would get wrong.

    Args:
        config: the model's transformers config.
        shared_prefix: ``learner.shared_prefix``.
        attn_implementation: ``learner.attn_implementation`` (None: the config's own).

    Raises:
        ValueError: an unknown post-head logit transform; bidirectional attention; attention-score
            soft-capping (Gemma 2's ``attn_logit_softcapping``) with an attention implementation other than
            eager, which transformers' sdpa path silently drops; with ``shared_prefix``, layers that are not
            attention or an attention layer type not in `ATTENTION_LAYER_TYPES` (the message says to set
            ``learner.shared_prefix = false``).
    """
    check_logits(config)
    config = _text_config(config)
    kind = config.model_type
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError(f"model type {kind!r} has use_bidirectional_attention = true: not a causal LM, "
                         "the learner cannot score it")
    impl = attn_implementation or getattr(config, "_attn_implementation", None)
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap and impl != "eager":
        raise ValueError(f"model type {kind!r} soft-caps its attention scores (attn_logit_softcapping = {cap}), "
                         f"which the {impl!r} attention implementation drops; "
                         "set learner.attn_implementation = 'eager'")
    if not shared_prefix:
        return
    layer_types = getattr(config, "layer_types", None) or []
    other = sorted(set(layer_types) - set(ATTENTION_LAYER_TYPES))
    recurrent = [k for k in vars(config) if k.startswith(_RECURRENT_HINTS) and getattr(config, k) not in (None, False)]
    if other or recurrent:
        feature = f"layer types {other}" if other else f"non-attention layers ({recurrent[0]})"
        raise ValueError(f"model type {kind!r} has {feature}, which the shared-prefix block mask "
                         "cannot confine to one sample; set learner.shared_prefix = false")


def sliding_window(config) -> tuple[int | None, bool]:
    """``(window, mixed)``: the sliding window of the model's sliding layers (None: none slides) and whether
    full-attention layers sit beside them (then the model takes a mask per layer type)."""
    config = _text_config(config)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window:
        return None, False
    if layer_types is None:  # Mistral, Mixtral, Phi-3: every layer slides when sliding_window is set
        return int(window), False
    if "sliding_attention" not in layer_types:
        return None, False
    return int(window), "full_attention" in layer_types


@dataclass(frozen=True)
class Scoring:
    """What the learner's scoring applies to one model on every forward, decided once by `scoring`.

    Attributes:
        transform: the model's post-head logit transform (`logit_transform`), or None.
        window: the sliding window of its sliding layers, in tokens (None: no layer slides).
        mixed: full-attention layers sit beside the sliding ones (the model takes a mask per layer type).
    """

    transform: Callable[[torch.Tensor], torch.Tensor] | None
    window: int | None
    mixed: bool


def scoring(config, shared_prefix: bool, attn_implementation: str | None = None) -> Scoring:
    """`check` the model, then what its scoring applies on every forward (`Scoring`).

    Args: as `check`.

    Raises:
        ValueError: what `check` refuses (one line naming the feature and the setting to change).
    """
    check(config, shared_prefix, attn_implementation)
    window, mixed = sliding_window(config)
    return Scoring(logit_transform(config), window, mixed)


def block_masks(allowed: torch.Tensor, position_ids: torch.Tensor, window: int | None, mixed: bool
                ) -> torch.Tensor | dict[str, torch.Tensor]:
    """The shared-prefix block mask as the model's layers need it.

    Args:
        allowed: ``[rows, L, L]`` bool, True where a query (dim 1) may attend to a key (dim 2).
        position_ids: ``[rows, L]`` each token's position in its own sample.
        window, mixed: the model's sliding window and whether full layers sit beside sliding ones
            (`sliding_window`, `Scoring`).

    Returns:
        ``allowed``, or with sliding-window layers ``allowed`` narrowed to keys fewer than ``window``
        positions behind the query (``q - k < window``, transformers' own window), the same tensor for
        every layer, or ``{"full_attention": allowed, "sliding_attention": windowed}`` when both kinds of
        layer are present. Within a block a query sees only its own sample's tokens, whose positions are
        those of its padded row, so the window is the one the model applies there.
    """
    if window is None:
        return allowed
    windowed = allowed & ((position_ids[:, :, None] - position_ids[:, None, :]) < window)
    return {"full_attention": allowed, "sliding_attention": windowed} if mixed else windowed
