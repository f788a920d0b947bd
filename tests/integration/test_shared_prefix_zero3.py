"""The shared-prefix forward through a real DeepSpeed ZeRO-3 engine (one process, gloo, every parameter
partitioned): the LM head is scored in chunks inside its one call, so ZeRO-3 gathers its (tied) weights for
forward and again for the chunks recomputed in backward; both prompts' blocks packed into one row. Logprobs and every gradient equal the plain padded
path on an unwrapped copy, for the full model and for a PEFT LoRA model. Runs in a subprocess: the process
group and DeepSpeed's state stay out of the test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ports import free_port

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]

CHECK = r'''
import copy, json, os, sys
import torch
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", DS_ACCELERATOR="cpu")
import deepspeed
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from buffer import Sample
from learner.step import response_logprobs

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
P1, P2 = [5, 6, 7, 8, 9], [11, 12, 13]
samples = [Sample("p", "g", p, [40 + (3 * j + i) % 90 for j in range(r)], [-1.0] * r, [0] * r)
           for i, (p, r) in enumerate([(P1, 4), (P2, 3), (P1, 0), (P1, 6), (P2, 2)])]
out = {}
for lora in (False, True):
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    if lora:
        m = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                         init_lora_weights=False))
    ref = copy.deepcopy(m)
    lp_ref, _ = response_logprobs(ref, samples, "cpu", 0.7, shared_prefix=False)
    lp_ref.sum().backward()
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    cfg = {"train_micro_batch_size_per_gpu": 5, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=m, model_parameters=[p for p in m.parameters() if p.requires_grad],
                                      config=cfg)
    lp, _ = response_logprobs(engine, samples, "cpu", 0.7, shared_prefix=True, chunk_tokens=3, pack_tokens=64)
    engine.backward(lp.sum())
    errs = {n: float((deepspeed.utils.safe_get_full_grad(p) - g_ref[n]).norm() / g_ref[n].norm())
            for n, p in engine.module.named_parameters() if n in g_ref}
    engine.step()
    out["lora" if lora else "full"] = {"logprob_err": float((lp.detach() - lp_ref.detach()).abs().max()),
                                       "grad_errs": errs}
print("RESULT", json.dumps(out))
'''


@pytest.mark.timeout(300)
def test_shared_prefix_under_zero3_matches_the_padded_path(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, "-c", CHECK, tiny_model], cwd=ROOT, capture_output=True, text=True,
                          timeout=280, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    for kind, r in res.items():
        assert r["logprob_err"] < 1e-5, kind
        assert r["grad_errs"] and max(r["grad_errs"].values()) < 1e-5, (kind, r["grad_errs"])
    assert all(".lora_" in n for n in res["lora"]["grad_errs"]) and len(res["full"]["grad_errs"]) > 10
