"""Probe whether a task gives GRPO a learning signal for a model, before spending a training run.

Plays the task with the rollout worker's own code (a local `RolloutWorker`: its prompts, built from ``data``
with its system prompt, one-shot demo, instruction or a conversational row's own messages; its environment,
``rollout.env``, the one-step ``single_turn`` by default; and its scorer, the run's ``[[rollout.rewards]]`` under
``rollout.reward_timeout_s``, isolated entries in their own processes). Prints one JSON line:

- ``greedy_accuracy`` (single-turn; ``greedy_episode_success`` with a multi-turn ``rollout.env``): held-out
  problems answered correctly at temperature 0 (the strict exact match, as ``eval/accuracy``; an environment's
  own ``correct``);
- for ``--groups`` training prompts sampled ``rollout.group_size`` times at the run's temperature:
  ``sampled_reward_mean`` (the weighted reward the learner would train on, over the samples whose reward
  functions did not fail), ``reward/<name>`` (each function's unweighted mean over the samples it applied to),
  ``reward_failures`` (samples a function failed), ``sampled_correct_frac`` and ``pass_at_n`` (strict
  correctness; `orchestrator.metrics.pass_at_k`, as ``eval/pass@k``), and ``mixed_group_frac``: the groups whose
  rewards differ, the only ones with non-zero GRPO advantage.

    .venv/bin/python scripts/probe_task.py deploy/examples/gsm_symbolic_smollm2.toml [overrides] \
        --eval 100 --groups 32 [--transcripts 5]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class _Kept:
    """The worker's buffer here: keeps every group the worker adds (the probe reads them, nothing trains)."""

    def __init__(self) -> None:
        self.groups: list[list[Any]] = []

    def add_groups(self, groups: list[list[Any]]) -> dict[str, Any]:
        self.groups += groups
        return {"kept": len(groups), "kept_ids": [g[0].group_id for g in groups], "held": len(self.groups)}


def probe(cfg, worker, eval_problems: int, groups: int, transcripts: int = 0) -> dict[str, Any]:
    """Probe ``cfg``'s task with ``worker``, a `rollout.worker.RolloutWorker` built from ``cfg.rollout`` and
    ``cfg.data`` whose buffer is a `_Kept`; returns the JSON record the module docstring describes.

    Args:
        eval_problems: held-out problems played greedily (at most ``data.eval_size``).
        groups: training prompts sampled ``rollout.group_size`` times each.
        transcripts: also return the assistant turns of this many greedy held-out episodes.

    Raises:
        ValueError: ``groups`` < 1, or the worker's buffer is not a `_Kept`.
    """
    from buffer import GenerateRequest, scored_rewards
    from orchestrator.metrics import pass_at_k
    from rollout.tasks import load_problems

    if groups < 1:
        raise ValueError(f"--groups {groups}: sample at least 1 group")
    if not isinstance(worker.buffer, _Kept):
        raise ValueError(f"probe: the worker's buffer is a {type(worker.buffer).__name__}; build it with _Kept()")
    rc, dc = cfg.rollout, cfg.data
    t0 = time.perf_counter()
    ev = load_problems(dc, "eval")[:eval_problems]
    played = worker.greedy_transcripts(ev, 0, cfg.eval_max_tokens or rc.max_tokens) if ev else []
    greedy = sum(e["correct"] for e in played) / len(ev) if ev else None
    tr = load_problems(dc, "train")[:groups]
    turns, env_failures, reward_failures, terms = 0, 0, 0, {}
    first = len(worker.buffer.groups)
    for i in range(0, len(tr), rc.prompts_per_request):  # requests as the driver sends them
        chunk = tr[i:i + rc.prompts_per_request]
        res = worker.generate(GenerateRequest(chunk, [f"g{i + j}" for j in range(len(chunk))],
                                              [rc.group_size] * len(chunk), 0, i))
        turns, env_failures = turns + res.turns, env_failures + res.env_failures + res.tool_failures
        reward_failures += res.reward_failures
        for name, total, applied, failed in res.reward_terms:
            t = terms.setdefault(name, [0.0, 0, 0])
            t[0], t[1], t[2] = t[0] + total, t[1] + applied, t[2] + failed
    sampled = worker.buffer.groups[first:]
    rewards = [scored_rewards(g) for g in sampled]
    scored = [r for g in rewards for r in g]
    samples = [s for g in sampled for s in g]
    multi_turn = rc.env.type != "single_turn"
    return {
        "task": dc.task if dc.type == "reasoning_gym" else dc.path, "env": rc.env.type, "model": cfg.model.path,
        "greedy_episode_success" if multi_turn else "greedy_accuracy": greedy, "eval_problems": len(ev),
        "sampled_reward_mean": sum(scored) / len(scored) if scored else None,
        **{f"reward/{name}": (s / n if n else None) for name, (s, n, _) in sorted(terms.items())},
        "reward_failures": reward_failures,
        "sampled_correct_frac": sum(s.correct for s in samples) / len(samples),
        "pass_at_n": sum(pass_at_k(len(g), sum(s.correct for s in g), len(g)) for g in sampled) / len(sampled),
        "n": rc.group_size,
        "mixed_group_frac": sum(len(r) > 1 and min(r) < max(r) for r in rewards) / len(rewards),
        "groups": len(sampled),
        **({"turns_per_episode": turns / len(samples), "env_and_tool_failures": env_failures} if multi_turn else {}),
        "seconds": round(time.perf_counter() - t0, 1),
        **({"greedy_transcripts": played[:transcripts]} if transcripts else {}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--eval", type=int, default=100, help="held-out problems, greedy")
    ap.add_argument("--groups", type=int, default=32, help="training prompts sampled group_size times")
    ap.add_argument("--transcripts", type=int, default=0,
                    help="also print the assistant turns of this many greedy held-out episodes")
    args = ap.parse_args()

    from orchestrator.config import load_config
    from orchestrator.models import resolve_model_path
    from rollout.worker import RolloutWorker

    cfg = load_config(args.config, args.overrides)
    worker = RolloutWorker(cfg.rollout, cfg.data, resolve_model_path(cfg.model.path), 0, _Kept())
    try:
        print(json.dumps(probe(cfg, worker, args.eval, args.groups, args.transcripts)))
    finally:
        worker.rewards.close()


if __name__ == "__main__":
    main()
