"""A run whose outputs live on an object store: ``output_dir = "s3://..."`` against a real S3-compatible
server (moto on loopback), two learner ranks that each upload their own checkpoint shards, the driver
SIGKILLed after a checkpoint, its local staging dir deleted, and ``--resume`` finding and finishing the
run from the bucket alone; the final model on S3 loads in transformers, and the storage credentials
appear in no file the run wrote.

Each run is a real ``relayrl train`` subprocess with its own local Ray instance; the credentials and
endpoint reach it (and its actors) through the environment only.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from base import storage
from orchestrator.checkpoint import find_run_to_resume
from orchestrator.run_outputs import staging_dir
from tiny_run import tiny_run_toml, train_cli

pytestmark = pytest.mark.integration
P, STEPS = 4, 3


def _config(tmp_path: Path, model: str, output: str) -> Path:
    return tiny_run_toml(tmp_path / "s3run.toml", model, output, "name=s3run", f"num_steps={STEPS}",
                         f"prompts_per_step={P}", "seed=5", "learner.num_learners=2", "learner.num_cpus=0.5",
                         "learner.micro_batch_size=4", "checkpoint.every=1", "checkpoint.keep=2", "ray.num_cpus=2")


def _jsonl(uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()]


@pytest.mark.timeout(600)
def test_run_on_s3_resumes_from_the_bucket_alone(tiny_sums_model, s3_bucket, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = storage.join(s3_bucket, "runs")
    cfg = _config(tmp_path, tiny_sums_model, output)
    train_cli(cfg, kill_when=lambda: find_run_to_resume(output, "s3run") is not None, timeout=300)
    run = find_run_to_resume(output, "s3run")
    ckpts = storage.join(run, "checkpoints")
    first = storage.join(ckpts, storage.children(ckpts)[0])
    learner_files = storage.children(storage.join(first, "learner", "deepspeed"))
    # each rank uploaded its own part: its optimizer partition and its RNG state
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        learner_files), learner_files
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(storage.children(storage.join(first, "learner")))
    assert not storage.exists(storage.join(run, "final_model"))

    local = staging_dir(run)
    assert (local / "metrics.jsonl").is_file()
    shutil.rmtree(local)  # a fresh machine: nothing of the run is left locally
    train_cli(cfg, "--resume", timeout=300)  # auto: finds the run on S3 by its complete checkpoint

    steps = _jsonl(storage.join(run, "metrics.jsonl"))
    assert [r["step"] for r in steps if r["step"] > 0] == list(range(1, STEPS + 1))  # the curve continues
    (resumed,) = [r for r in steps if "resume/step" in r]
    assert resumed["step"] == resumed["resume/step"] + 1 and resumed["resume/step"] >= 1
    trained = [g for r in _jsonl(storage.join(run, "trained_groups.jsonl")) for g in r["groups"]]
    assert len(trained) == STEPS * P and len(set(trained)) == len(trained)  # nothing lost, nothing twice
    summary = json.loads(storage.read_bytes(storage.join(run, "summary.json")))
    assert summary["final_model"] == storage.join(run, "final_model") and summary["step"] == STEPS
    assert storage.children(ckpts) == [f"step_{s:06d}" for s in (STEPS - 1, STEPS)]  # keep = 2, all complete

    with storage.local_copy(storage.join(run, "final_model")) as model_dir:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(tiny_sums_model)
        ids = torch.tensor([tok("2 + 3 =")["input_ids"]])
        with torch.no_grad():
            logits, base_logits = model(ids).logits, base(ids).logits
        assert torch.isfinite(logits).all() and not torch.allclose(logits, base_logits)  # the trained policy

    # the credentials came from the environment and went nowhere: not on S3, not in the staging dir
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    fs, root = storage.filesystem(s3_bucket)
    objects = fs.find(root)
    assert len(objects) > 20
    assert not [o for o in objects if secret in fs.cat_file(o)]
    assert not [p for p in local.rglob("*") if p.is_file() and secret in p.read_bytes()]
