"""The learner-engine logprob gap the sentinel bounds, measured outside a run (where its defaults come from).

A vLLM engine (`rollout.engine.VLLMEngine`, ``ENGINE_DTYPE``) samples responses to a few chat prompts at the
rollout temperature; the learner's scoring (`learner.step.response_logprobs` on an HF model in
``LEARNER_DTYPE``, as the learner computes in that dtype) scores them; `learner.sentinel.logprob_gap`
compares the two on every sampled token. ``--rope F`` gives the learner's copy of the model linear RoPE
scaling F that the engine does not apply (a model feature one side ignores); ``--corrupt NAME:SCALE`` loads
the engine with tensor NAME scaled (a bad weight push). Prints one JSON line: the gap over all tokens and
the worst single response's.

    python -m tooling.sentinel_gap MODEL_DIR bfloat16 bf16 --samples 32 --max-tokens 128

Left out on purpose: Ray, DeepSpeed and the run loop (the sentinel itself runs in `orchestrator.sentinel`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

QUESTIONS = ["What is 3 + 4?", "Calculate 12 + 35.", "Write a short sentence about the sea.", "What is 7 - 2?"]


def _corrupted_buckets(model_dir: str, name: str, scale: float, dtype: str) -> list[bytes]:
    import torch
    from safetensors.torch import load_file

    from base.weight_buckets import serialize_buckets

    weights = {}
    for f in sorted(os.listdir(model_dir)):
        if f.endswith(".safetensors"):
            weights.update(load_file(os.path.join(model_dir, f)))
    if name not in weights:
        raise ValueError(f"--corrupt: no tensor {name!r} in {model_dir}")
    dt = getattr(torch, dtype)
    return serialize_buckets(((k, (v * scale if k == name else v).to(dt)) for k, v in weights.items()), 1 << 30)


def _with_linear_rope(model_dir: str, factor: float) -> str:
    copy = tempfile.mkdtemp(prefix="sentinel-gap-rope-")
    shutil.copytree(model_dir, copy, dirs_exist_ok=True)
    path = os.path.join(copy, "config.json")
    config = json.load(open(path))
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0)}
    config["rope_parameters"] = {**rope, "rope_type": "linear", "factor": factor}
    json.dump(config, open(path, "w"))
    return copy


def measure(model_dir: str, engine_dtype: str, learner_dtype: str, samples: int = 32, max_tokens: int = 128,
            temperature: float = 1.0, rope: float = 0.0, corrupt: str = "") -> dict[str, float]:
    """The gap (`learner.sentinel.logprob_gap`, nats/token) over ``samples`` sampled responses, and the largest
    per-response mean |delta| and mismatch KL (``worst_response_*``)."""
    import torch

    from buffer import Sample
    from learner.sentinel import logprob_gap
    from learner.step import padded_field, response_logprobs
    from rollout.engine import VLLMEngine
    from transformers import AutoModelForCausalLM

    engine = VLLMEngine(model_dir, engine_dtype, 64 << 20, 512, seed=0)
    if corrupt:
        name, scale = corrupt.rsplit(":", 1)
        engine.load_weights(_corrupted_buckets(model_dir, name, float(scale), engine_dtype))
    tok = engine.tokenizer
    prompts = [list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]) for q in QUESTIONS]
    groups = engine.generate(prompts, max(1, samples // len(prompts)), max_tokens, temperature, 1.0, seed=1)
    batch = [Sample("p", "g", p, c.token_ids, c.logprobs, [0] * len(c.token_ids), [1] * len(c.token_ids))
             for p, g in zip(prompts, groups) for c in g if c.token_ids]
    model = AutoModelForCausalLM.from_pretrained(_with_linear_rope(model_dir, rope) if rope else model_dir,
                                                 dtype=torch.float32, attn_implementation="sdpa")
    model = model.to(torch.bfloat16 if learner_dtype == "bf16" else torch.float32).eval()
    with torch.no_grad():
        lp, mask = response_logprobs(model, batch, torch.device("cpu"), temperature, True, 1024)
    lp = lp.float()
    behaviour = padded_field(batch, "behaviour_logprobs", lp, 0.0)
    per = [logprob_gap(lp[i:i + 1], behaviour[i:i + 1], mask[i:i + 1]) for i in range(len(batch))]
    return {**logprob_gap(lp, behaviour, mask), "responses": float(len(batch)),
            "worst_response_mean_abs_logprob_diff": max(p["mean_abs_logprob_diff"] for p in per),
            "worst_response_mismatch_kl": max(p["mismatch_kl"] for p in per)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("engine_dtype", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("learner_dtype", choices=["bf16", "fp32"])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--rope", type=float, default=0.0, help="learner-only linear RoPE scaling factor")
    ap.add_argument("--corrupt", default="", help="NAME:SCALE, a tensor the engine loads scaled")
    a = ap.parse_args(argv)
    out = measure(a.model_dir, a.engine_dtype, a.learner_dtype, a.samples, a.max_tokens, a.temperature, a.rope,
                  a.corrupt)
    print(json.dumps({"case": vars(a), **out}))  # noqa: T201 (a command-line report)


if __name__ == "__main__":
    main()
