"""LoRA RL end to end: adapters trained under DeepSpeed ZeRO-3 on 2 ranks, adapter-only pushes (collective
transport, applied inside requests) served by vLLM as LoRA adapters, the push check, the KL reference,
the final merged model and adapter, and resume onto a worker that merges pushed adapters itself."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from orchestrator.checkpoint import latest_checkpoint
from orchestrator.loop import Trainer
from rollout.tasks import load_problems

pytestmark = pytest.mark.integration

LOGPROB_TOL = 1e-3  # fp32 on both sides: vLLM's LoRA path and peft agree to ~3e-5 nats on SmolLM2 (measured)
TARGETS = ("q_proj", "v_proj", "up_proj")


def _lora_params(model_dir: str, rank: int) -> int:
    """Adapter parameters of ``TARGETS`` at ``rank``: r * (in + out) per targeted linear layer."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir)
    return sum(rank * (mod.in_features + mod.out_features) for n, mod in m.named_modules()
               if n.rsplit(".", 1)[-1] in TARGETS)


@pytest.mark.timeout(900)
def test_lora_zero3_pushes_adapters_only_and_resumes(tiny_sums_model, ray_local, tmp_path):
    import ray
    from tiny_model import hf_logprobs, vllm_logprobs
    from tiny_run import tiny_run_config

    from base.weight_buckets import iter_buckets, serialize_buckets

    cfg, merge_cfg = (tiny_run_config(
        tiny_sums_model, tmp_path, f"rollout.lora_serving={serving}", "learner.num_learners=2", "learner.zero_stage=3", "learner.micro_batch_size=4",
        "learner.num_cpus=0.5", "learner.lr=0.02", "learner.kl_coef=0.01", "checkpoint.every=3",
        # adapters over the collective transport, applied inside requests every 4 tokens
        "weights.type=collective", "rollout.update_interval_tokens=4",
        f"learner.lora={{rank = 8, alpha = 16.0, target_modules = {list(TARGETS)!r}}}".replace("'", '"'))
        for serving in ("adapter", "merge"))
    run_dir = tmp_path / "lora"
    problems = load_problems(cfg.data, "train")
    trainer = Trainer(cfg, run_dir, tiny_sums_model, problems, [])
    tok_ids = list(range(5, 45))
    try:
        summary = trainer.run(progress=False)
        # the optimizer holds the adapters only (what setup counted as trainable)
        assert trainer.learner.num_params == _lora_params(tiny_sums_model, 8)
        worker = trainer.rollout.workers[0]
        learner_lp = torch.tensor(trainer.learner.sequence_logprobs(tok_ids, 8))
        served_lp = torch.tensor(ray.get(worker.sequence_logprobs.remote(tok_ids, 8), timeout=120))
        # a wrongly scaled adapter (B doubled) pushed as the next version fails the same check
        buckets = ray.get(trainer.learner.export_weights_remote("float32", 1 << 20)[0], timeout=120)
        doubled = serialize_buckets(((n, t * 2 if ".lora_B." in n else t) for n, t in iter_buckets(buckets)), 1 << 20)
        ray.get(worker.receive_weights.remote(trainer.version + 1, doubled), timeout=120)
        wrong_lp = torch.tensor(ray.get(worker.sequence_logprobs.remote(tok_ids, 8), timeout=120))
    finally:
        trainer.shutdown()
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    # the KL reference is the policy with its adapters disabled: 0 before the first update, > 0 after
    assert recs[0]["learner/kl_ref"] == pytest.approx(0.0, abs=1e-7) and recs[-1]["learner/kl_ref"] > 1e-5, \
        [r["learner/kl_ref"] for r in recs]
    adapter_bytes = _lora_params(tiny_sums_model, 8) * 4  # pushed in rollout.dtype = float32
    # every push carried the adapter tensors only (plus safetensors headers), never the full model
    assert len(recs) == 3 and all(adapter_bytes <= r["weights/bytes"] < 1.5 * adapter_bytes for r in recs), \
        [r["weights/bytes"] for r in recs]
    assert all(r["weights/broadcast_seconds"] > 0 for r in recs) and recs[-1]["weights/push_fallbacks_total"] == 0
    base_lp = hf_logprobs(tiny_sums_model, tok_ids, 8)
    assert (learner_lp - base_lp).abs().max().item() > 50 * LOGPROB_TOL  # the adapters moved the policy
    assert (learner_lp - served_lp).abs().max().item() < LOGPROB_TOL  # ... and the worker serves them
    assert (learner_lp - wrong_lp).abs().max().item() > 10 * LOGPROB_TOL
    # final output: the merged HF model (transformers and vLLM load it) and the PEFT adapter
    final = summary["final_model"]
    # a fresh vLLM engine on the merged model, in a subprocess of its own, starts while the resume below runs
    with ThreadPoolExecutor(1) as pool:
        final_vllm_lp = pool.submit(vllm_logprobs, final, tok_ids, 8)
        assert (hf_logprobs(final, tok_ids, 8) - learner_lp).abs().max().item() < LOGPROB_TOL
        assert json.loads((run_dir / "final_model" / "adapter" / "adapter_config.json").read_text())["r"] == 8

        # resume: the checkpoint holds the adapters (not the frozen base); a new learner restores the policy, and
        # a worker that merges the pushed adapter into its base weights serves it too
        ckpt = Path(latest_checkpoint(run_dir))
        shards = sum(f.stat().st_size for f in (ckpt / "learner").rglob("*model_states.pt"))
        # measured: ~30 KB with the adapters only, ~520 KB when the frozen base weights are saved as well
        assert shards < 2 * adapter_bytes, shards
        resumed = Trainer(merge_cfg, run_dir, tiny_sums_model, problems, [], resume_from=ckpt)
        try:
            assert resumed.version == 3
            restored_lp = torch.tensor(resumed.learner.sequence_logprobs(tok_ids, 8))
            pushed_lp = torch.tensor(ray.get(resumed.rollout.workers[0].sequence_logprobs.remote(tok_ids, 8, 3),
                                             timeout=120))
        finally:
            resumed.shutdown()
        assert (final_vllm_lp.result(timeout=300) - learner_lp).abs().max().item() < LOGPROB_TOL
    assert (restored_lp - learner_lp).abs().max().item() < 1e-5
    assert (pushed_lp - learner_lp).abs().max().item() < LOGPROB_TOL
