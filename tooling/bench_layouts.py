"""``learner_layouts``: the learner's forward + backward on one micro-batch laid out as one padded row per sample,
as one shared-prefix row, and as the default chooses (`learner.layout.shared_prefix_pays`), for short and long
responses.

No Ray, DeepSpeed or engine: `learner.step.response_logprobs` and ``backward()`` on the config model's architecture
with ``LAYERS`` decoder layers, randomly initialised (the layout's cost is per layer; a shallower copy keeps the
long-response shape to minutes on a CPU), fp32, ``REPEATS`` rounds after a warm-up round, the three variants
interleaved in each round, minimum kept.
"""

from __future__ import annotations

import random
import time

from tooling.bench_math import Row, row

LAYERS = 4
REPEATS = 2
# name -> (prompt tokens, response tokens, responses): a group of one prompt
SHAPES = {"8 x 32 after 256": (256, 32, 8), "8 x 1024 after 64": (64, 1024, 8), "8 x 256 after 512": (512, 256, 8),
          "8 x 256 after 128": (128, 256, 8)}  # the last near where the cost model switches (1.08: padded)
NOTE = ("`learner_layouts`: one micro-batch (a group: one prompt, its responses; random token ids) through "
        "`response_logprobs` and `backward()` on the config model's architecture cut to "
        f"{LAYERS} decoder layers, random weights, fp32, sdpa; min of {REPEATS} rounds after a warm-up round, the "
        "variants interleaved in each round. "
        "`padded`: one right-padded row per sample; `shared prefix`: the prompt once and every response in one "
        "row under a block mask; `default`: the layout `learner.shared_prefix_by_cost` picks. The target: the "
        "default within 5% of the faster of the two.")


def _seconds(model, samples: list, variants: dict[str, dict]) -> dict[str, float]:
    """Min seconds of a forward + backward per variant (``response_logprobs`` keywords), the variants interleaved
    in each round (a slow spell of the machine hits all of them), ``REPEATS`` rounds after a warm-up round."""
    from learner.step import response_logprobs

    best = {name: float("inf") for name in variants}
    for i in range(REPEATS + 1):
        for name, kw in variants.items():
            t0 = time.perf_counter()
            lp, mask = response_logprobs(model, samples, "cpu", 1.0, **kw)
            (lp * mask).sum().backward()
            model.zero_grad(set_to_none=True)
            if i:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bench_learner_layouts(s) -> dict[str, Row]:
    """Rows per shape: seconds of padded, shared prefix and default, and default / the faster one (%)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from buffer import Sample
    from learner.layout import attention_pair_weight, shared_prefix_pays

    config = AutoConfig.from_pretrained(s.model_path)
    config.num_hidden_layers = LAYERS
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:LAYERS]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    rng = random.Random(0)
    rows, raw = {}, {}
    for name, (P, R, k) in SHAPES.items():
        prompt = [rng.randrange(5, config.vocab_size) for _ in range(P)]
        samples = [Sample("p", "g", prompt, resp, [0.0] * R, [0] * R)
                   for resp in ([rng.randrange(5, config.vocab_size) for _ in range(R)] for _ in range(k))]
        t = _seconds(model, samples, {"padded": dict(shared_prefix=False), "shared prefix": dict(shared_prefix=True),
                                      "default": dict(shared_prefix=True, by_cost=True)})
        picks = "shared prefix" if shared_prefix_pays(samples, attention_pair_weight(config)) else "padded"
        raw[name] = {"seconds": t, "default picks": picks}
        for layout, sec in t.items():
            rows[f"{name}: {layout}"] = row(sec, "s")
        rows[f"{name}: default (picks {picks}) / faster"] = row(
            100 * t["default"] / min(t["padded"], t["shared prefix"]), "%", ("<=", 105))
    s.raw["learner_layouts"] = {"layers": LAYERS, "repeats": REPEATS, "shapes": raw}
    return rows
