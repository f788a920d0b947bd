"""Probe whether a task gives GRPO a learning signal for a model, before spending a training run.

Prints the base model's greedy held-out accuracy (strict exact match) and, for sampled groups at
the run's temperature, the mean reward, pass@n and the fraction of groups with mixed rewards (the
only groups with non-zero GRPO advantage). With a multi-turn ``rollout.env`` each sample is an episode
played by the rollout worker's own code (`RolloutWorker.generate` / `evaluate`), and accuracy is the
environment's ``correct``.

    .venv/bin/python scripts/probe_task.py deploy/examples/gsm_symbolic_smollm2.toml [overrides] \
        --eval 100 --groups 32 [--transcripts 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--eval", type=int, default=100, help="held-out problems, greedy")
    ap.add_argument("--groups", type=int, default=32, help="training prompts sampled group_size times")
    ap.add_argument("--transcripts", type=int, default=0,
                    help="with rollout.env: also print the assistant turns of this many greedy held-out episodes")
    args = ap.parse_args()

    from orchestrator.config import load_config
    from orchestrator.models import resolve_model_path
    from rollout.engine import VLLMEngine
    from rollout.rewards import score_response
    from rollout.tasks import encode_prompt, greedy_accuracy, load_problems

    cfg = load_config(args.config, args.overrides)
    rc, dc = cfg.rollout, cfg.data
    if rc.env.type != "single_turn":
        return probe_episodes(cfg, args)
    engine = VLLMEngine(resolve_model_path(cfg.model.path), rc.dtype, rc.kv_cache_memory_bytes, rc.max_model_len)

    def encode(ps):
        return [encode_prompt(engine.tokenizer, p.question, dc.instruction, dc.one_shot) for p in ps]

    t0 = time.perf_counter()
    ev = load_problems(dc, "eval")[: args.eval]
    greedy = greedy_accuracy(engine, ev, dc.instruction, dc.one_shot, cfg.eval_max_tokens or rc.max_tokens) if ev else 0.0
    tr = load_problems(dc, "train")[: args.groups]
    outs = engine.generate(encode(tr), rc.group_size, rc.max_tokens, rc.temperature, seed=0)
    rewards = [[score_response(c.text, p.answer)[0] for c in o] for p, o in zip(tr, outs)]
    mixed = sum(0 < sum(r) < len(r) for r in rewards) / len(rewards)
    print(json.dumps({
        "task": dc.task if dc.type == "reasoning_gym" else dc.path, "model": cfg.model.path,
        "greedy_accuracy": greedy, "eval_problems": len(ev),
        "sampled_reward_mean": sum(map(sum, rewards)) / sum(map(len, rewards)),
        "pass_at_n": sum(any(r) for r in rewards) / len(rewards), "n": rc.group_size,
        "mixed_group_frac": mixed, "groups": len(rewards), "seconds": round(time.perf_counter() - t0, 1),
    }))


def probe_episodes(cfg, args) -> None:
    """The probe for ``rollout.env``: greedy episodes on held-out problems, sampled groups of episodes."""
    from buffer import GenerateRequest
    from buffer.replay import ReplayBuffer
    from orchestrator.models import resolve_model_path
    from rollout.tasks import load_problems
    from rollout.worker import RolloutWorker

    rc, dc = cfg.rollout, cfg.data
    t0 = time.perf_counter()
    worker = RolloutWorker(rc, dc, resolve_model_path(cfg.model.path), 0, ReplayBuffer())
    ev = load_problems(dc, "eval")[: args.eval]
    played = worker.greedy_transcripts(ev, 0, cfg.eval_max_tokens or rc.max_tokens)
    greedy = sum(e["correct"] for e in played) / len(ev) if ev else 0.0
    tr = load_problems(dc, "train")[: args.groups]
    rewards, turns, failures = [], 0, 0
    for i in range(0, len(tr), rc.prompts_per_request):
        chunk = tuple(tr[i:i + rc.prompts_per_request])
        res = worker.generate(GenerateRequest(chunk, tuple(f"g{i + j}" for j in range(len(chunk))),
                                              (rc.group_size,) * len(chunk), 0, i))
        rewards += [list(r) for _, r in res.group_rewards]
        turns, failures = turns + res.turns, failures + res.env_failures + res.tool_failures
    n = sum(map(len, rewards))
    print(json.dumps({
        "task": dc.task if dc.type == "reasoning_gym" else dc.path, "env": rc.env.type, "model": cfg.model.path,
        "greedy_episode_success": greedy, "eval_problems": len(ev), "sampled_reward_mean": sum(map(sum, rewards)) / n,
        "pass_at_n": sum(any(r) for r in rewards) / len(rewards), "n": rc.group_size,
        "mixed_group_frac": sum(min(r) < max(r) for r in rewards) / len(rewards), "groups": len(rewards),
        "turns_per_episode": turns / n, "env_and_tool_failures": failures,
        "seconds": round(time.perf_counter() - t0, 1),
        **({"greedy_transcripts": played[: args.transcripts]} if args.transcripts else {})}))


if __name__ == "__main__":
    main()
