"""Time the learner's forward + backward of one main-job group under each way of laying it out.

One group: a 121-token prompt and 8 responses of 16-23 tokens (random token ids), the model in bf16 or
fp32 on one thread, temperature 0.7. Paths, timed round robin (so load on a shared machine spreads over
all of them), minimum and all times printed:

- ``padded, full logits``: one right-padded row per sample, LM head at every position (before issue 15);
- ``padded, logits from shortest prompt``: the same with transformers' ``logits_to_keep`` (the first cut);
- ``padded, response positions`` (``learner.shared_prefix = false``) and ``shared prefix``
  (``learner.shared_prefix = true``): `learner.step.response_logprobs`;
- ``KV cache shared``: the prompt once with ``use_cache``, its cache repeated for the 8 responses (two
  forwards), the alternative to the packed row that was measured against it.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python scripts/time_learner_paths.py MODEL_DIR bf16 --reps 5
"""

from __future__ import annotations

import argparse
import random
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("dtype", choices=["bf16", "fp32"])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from buffer import Sample
    from learner.step import response_logprobs

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype={"bf16": torch.bfloat16,
                                                                        "fp32": torch.float32}[args.dtype])
    model.config.use_cache = False
    rng, V, T = random.Random(0), model.config.vocab_size, 0.7
    prompt = [rng.randrange(V) for _ in range(121)]
    samples = [Sample("p", "g", prompt, [rng.randrange(V) for _ in range(r)], [-1.0] * r, [0] * r)
               for r in (16, 18, 20, 20, 21, 22, 23, 20)]
    P = len(prompt)

    def padded(keep_from: int | None) -> torch.Tensor:
        L = max(s.num_tokens for s in samples)
        ids = torch.zeros(len(samples), L, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(samples):
            ids[i, : s.num_tokens], attn[i, : s.num_tokens] = torch.tensor(s.prompt_ids + s.response_ids), 1
        first = keep_from or 0
        logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=L - first).logits.float() / T
        return torch.cat([torch.log_softmax(logits[i, P - 1 - first: P - 1 - first + len(s.response_ids)], -1)
                          .gather(1, torch.tensor(s.response_ids)[:, None]).squeeze(1) for i, s in enumerate(samples)])

    def kv_cache() -> torch.Tensor:
        out = model(input_ids=torch.tensor([prompt]), past_key_values=DynamicCache(config=model.config),
                    use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        cache.batch_repeat_interleave(len(samples))
        R = max(len(s.response_ids) for s in samples)
        ids = torch.zeros(len(samples), R, dtype=torch.long)
        attn = torch.zeros(len(samples), P + R, dtype=torch.long)
        attn[:, :P] = 1
        for i, s in enumerate(samples):
            ids[i, : len(s.response_ids)], attn[i, P: P + len(s.response_ids)] = torch.tensor(s.response_ids), 1
        logits = model(input_ids=ids, attention_mask=attn, position_ids=torch.arange(P, P + R).expand(len(samples), R),
                       past_key_values=cache, use_cache=True).logits.float() / T
        first = torch.log_softmax(out.logits[0, -1].float() / T, -1)
        return torch.cat([torch.cat([first[s.response_ids[0]][None], torch.log_softmax(
            logits[i, : len(s.response_ids) - 1], -1).gather(1, torch.tensor(s.response_ids[1:])[:, None]).squeeze(1)])
            for i, s in enumerate(samples)])

    paths = {
        "padded, full logits": lambda: padded(None),
        "padded, logits from shortest prompt": lambda: padded(P - 1),
        "padded, response positions (shared_prefix=false)":
            lambda: response_logprobs(model, samples, "cpu", T, shared_prefix=False)[0],
        "shared prefix (shared_prefix=true)":
            lambda: response_logprobs(model, samples, "cpu", T, shared_prefix=True)[0],
        "KV cache shared (2 forwards)": kv_cache,
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(args.reps):
        for name, f in paths.items():
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            f().sum().backward()
            times[name].append(time.perf_counter() - t0)
    base = min(times["padded, full logits"])
    for name, t in times.items():
        print(f"{args.dtype}  {name:50s} min {min(t):6.2f} s  ({base / min(t):4.2f}x)  "
              f"all {[round(x, 2) for x in t]}")


if __name__ == "__main__":
    main()
