"""LoRA on the learner side: wrap a model with PEFT adapters, and write the final merged model.

The adapter format that crosses actors (`base.adapter.LoraSpec`, PEFT names, the adapter dir) is in
buffer/; `LearnerWorker` calls these two functions when ``learner.lora`` is set.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from base.adapter import LoraSpec


def with_lora(model, spec: LoraSpec):
    """``model`` wrapped as a PEFT LoRA model: base weights frozen, adapters (B = 0 at start) trainable.

    Raises:
        ValueError: a target module matches no module of the model (the error lists the model's modules).
    """
    from peft import LoraConfig, get_peft_model

    from base.adapter import check_target_modules

    check_target_modules(spec, (n for n, _ in model.named_modules()))
    cfg = spec.peft_config()
    return get_peft_model(model, LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
                                            target_modules=cfg["target_modules"], bias="none", task_type="CAUSAL_LM"))


def save_merged(out_dir: str, model_path: str, spec: LoraSpec, adapter: dict) -> None:
    """Write ``adapter`` (PEFT names -> tensors) as the PEFT adapter dir ``out_dir/adapter`` and merged into a
    fresh copy of the base model at ``model_path``, in the dtype of its checkpoint (the merged model is saved in
    it: no fp32 copy of a bf16 base on rank 0's host), as the HF model dir ``out_dir``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from base.adapter import write_adapter_dir

    adapter_dir = write_adapter_dir(os.path.join(out_dir, "adapter"), spec, ((n, t.float()) for n, t in adapter.items()))
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().save_pretrained(out_dir, safe_serialization=True)
