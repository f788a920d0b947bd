"""``learner_layouts``: the learner's forward + backward on one micro-batch laid out as one padded row per sample,
as one shared-prefix row, and which of the two the default picks (`learner.layout.shared_prefix_pays`), for short
and long responses.

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
REPEATS = 2  # timed rounds, at least
MAX_REPEATS = 10
ROUND_BUDGET_S = 20.0  # short shapes get more rounds, up to MAX_REPEATS: a min of 2 sub-second steps is noisy
# name -> (prompt tokens, response tokens, responses): a group of one prompt
SHAPES = {"8 x 32 after 256": (256, 32, 8), "8 x 1024 after 64": (64, 1024, 8), "8 x 256 after 512": (512, 256, 8),
          "8 x 256 after 128": (128, 256, 8)}  # the last near where the cost model switches (1.08: padded)
NOTE = ("`learner_layouts`: one micro-batch (a group: one prompt, its responses; random token ids) through "
        "`response_logprobs` and `backward()` on the config model's architecture cut to "
        f"{LAYERS} decoder layers, random weights, fp32, sdpa; min over rounds after a warm-up round ({REPEATS} "
        f"to {MAX_REPEATS} rounds: until the timed rounds add up to {ROUND_BUDGET_S:g} s), the variants "
        "interleaved in each round. "
        "`padded`: one right-padded row per sample; `shared prefix`: the prompt once and every response in one "
        "row under a block mask, the two in alternating order from round to round. The default "
        "(`learner.shared_prefix_by_cost`) runs the layout it picks (checked), so its row is the picked layout's "
        "time over the faster one's; the target: within 5%.")


def _seconds(model, samples: list, variants: dict[str, dict]) -> tuple[dict[str, float], int]:
    """Min seconds of a forward + backward per variant (``response_logprobs`` keywords), the variants interleaved
    in each round (a slow spell of the machine hits all of them), and the number of timed rounds: after a
    warm-up round, at least ``REPEATS``, then more until they add up to ``ROUND_BUDGET_S`` (``MAX_REPEATS``
    at most)."""
    from learner.step import response_logprobs

    best = {name: float("inf") for name in variants}
    rounds, spent = 0, 0.0
    for i in range(MAX_REPEATS + 1):
        order = list(variants.items())
        for name, kw in order[::-1] if i % 2 else order:  # each variant runs first in every other round
            t0 = time.perf_counter()
            lp, mask = response_logprobs(model, samples, "cpu", 1.0, **kw)
            (lp * mask).sum().backward()
            model.zero_grad(set_to_none=True)
            if i:
                dt = time.perf_counter() - t0
                best[name], spent = min(best[name], dt), spent + dt
        rounds = i
        if rounds >= REPEATS and spent >= ROUND_BUDGET_S:
            break
    return best, rounds


def bench_learner_layouts(s) -> dict[str, Row]:
    """Rows per shape: seconds of padded and shared prefix, and the layout the default picks over the faster one (%)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from buffer import Sample
    from learner.layout import attention_pair_weight, shared_prefix_pays
    from learner.step import _choose_layout

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
        t, rounds = _seconds(model, samples, {"padded": dict(shared_prefix=False),
                                              "shared prefix": dict(shared_prefix=True)})
        picks = "shared prefix" if shared_prefix_pays(samples, attention_pair_weight(config)) else "padded"
        # the default runs exactly the layout it picks (learner.step._choose_layout): timing it a third time
        # measured the same computation again, up to 16% apart from its twin in one run (machine noise)
        _, shared = _choose_layout(samples, config, True, True, 0)
        assert shared == (picks == "shared prefix"), (shared, picks)
        raw[name] = {"seconds": t, "default picks": picks, "rounds": rounds}
        for name_, sec in t.items():
            rows[f"{name}: {name_}"] = row(sec, "s")
        rows[f"{name}: default (picks {picks}) / faster"] = row(
            100 * t[picks] / min(t["padded"], t["shared prefix"]), "%", ("<=", 105))
    s.raw["learner_layouts"] = {"layers": LAYERS, "repeats": [REPEATS, MAX_REPEATS], "round_budget_s": ROUND_BUDGET_S,
                                "shapes": raw}
    return rows
