"""The learner's optimizer step through a real DeepSpeed engine (one process, gloo), built from
`learner.ds_config.deepspeed_config`: torch's fused AdamW on the flat ZeRO partitions. Three steps of
ZeRO-2 and ZeRO-3 leave every parameter where three steps of plain per-tensor `torch.optim.AdamW` with
the same gradients, global-norm clipping (`torch.nn.utils.clip_grad_norm_`) and weight decay leave an
unwrapped copy. Runs in a subprocess: the process group and DeepSpeed's state stay out of the test session."""

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
from transformers import AutoModelForCausalLM
from learner.config import LearnerConfig
from learner.ds_config import deepspeed_config

deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
ids = torch.tensor([[5, 6, 7, 8, 9, 40, 41, 42], [11, 12, 13, 50, 51, 52, 53, 54]])
out = {}
for stage in (2, 3):
    c = LearnerConfig(zero_stage=stage, dtype="fp32", lr=1e-3, weight_decay=0.01, grad_clip=0.5,
                      micro_batch_size=2, zero3_param_persistence_threshold=0)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    ref = copy.deepcopy(m)
    opt = torch.optim.AdamW(ref.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.999),
                            eps=1e-8, foreach=False)
    engine, *_ = deepspeed.initialize(model=m, model_parameters=list(m.parameters()),
                                      config=deepspeed_config(c, gas=1, samples_per_step=2))
    norms = []
    for step in range(3):
        loss = engine(input_ids=ids, labels=ids).loss * (step + 1)  # growing gradients: clipped from step 1
        engine.backward(loss)
        engine.step()
        opt.zero_grad()
        (ref(input_ids=ids, labels=ids).loss * (step + 1)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), c.grad_clip)))
        opt.step()
    inner = engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), enabled=stage == 3):
        errs = {n: float((p.detach() - r.detach()).norm() / r.detach().norm())
                for (n, p), r in zip(engine.module.named_parameters(), ref.parameters())}
        moved = max(float((p.detach() - q.detach()).abs().max())
                    for p, q in zip(engine.module.parameters(),
                                    AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).parameters()))
    out[stage] = {"fused": bool(inner.defaults.get("fused")), "errs": errs, "moved": moved, "norms": norms}
print("RESULT", json.dumps(out))
'''


@pytest.mark.timeout(300)
def test_fused_adamw_steps_like_per_tensor_adamw_under_zero2_and_zero3(tiny_model):
    proc = subprocess.run([sys.executable, "-c", CHECK, tiny_model], cwd=ROOT, capture_output=True, text=True,
                          timeout=280, env={**os.environ, "MASTER_PORT": str(free_port())})
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    for stage, r in res.items():
        assert r["fused"], stage
        assert r["moved"] > 1e-4, stage  # the steps did move the weights
        assert max(r["norms"][1:]) > 0.5, (stage, r["norms"])  # clipping was active
        assert len(r["errs"]) > 10 and max(r["errs"].values()) < 1e-5, (stage, r["errs"])
