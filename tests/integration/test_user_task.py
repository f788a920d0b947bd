"""A user's own reward functions, environment and dataset in a real run (Ray + vLLM + DeepSpeed on the tiny random
model): modules that live only in the test's tmp dir, outside the driver's working dir Ray ships to its workers,
reach the rollout actors; the data is a conversational jsonl (TRL's format) whose extra column and messages reach
the reward functions in the actors; each function's mean is a metric beside the total, and the total is the
weighted sum. The environment's step hangs once: the worker is restarted, the request re-issued, the run goes on."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

from orchestrator.loop import Trainer
from rollout.tasks import load_problems
from tiny_run import tiny_run_config

pytestmark = pytest.mark.integration

USER_REWARDS = '''
def digit_frac(completions, **kwargs):
    """TRL's signature: the fraction of digits in each completion (signal on a random model)."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

async def short(prompts, completions, answer, **kwargs):
    """Async, with the reference column: 1.0 for a completion of at most 20 characters."""
    return [float(len(c) <= 20) for c in completions]

def row_tag(prompts, completions, tag, **kwargs):
    """An extra column of the data row, as TRL hands it: every row's tag is 0.25."""
    return [float(t) for t in tag]

def saw_system(prompts, completions, **kwargs):
    """Conversational format: the prompts are the row's own messages, which open with a system message."""
    return [float(p[0] == {"role": "system", "content": "You add."}) for p in prompts]
'''
USER_ENV = '''
import os
import time

from rollout.envs.builtin import SingleTurn

MARKER = {marker!r}


class HangsOnce(SingleTurn):
    """The single-turn task as a user's environment whose first step of the run hangs (the marker file survives the
    worker's restart, so the new worker's steps do not)."""

    @classmethod
    def worker_config(cls, cfg, rollout, data):
        return super().worker_config(cfg, rollout, data).model_copy(update={{"step_timeout_s": cfg.step_timeout_s}})

    def step(self, action):
        if not os.path.exists(MARKER):
            open(MARKER, "w").close()
            time.sleep(600)  # hung: the worker is killed long before
        return super().step(action)
'''
ROWS = [{"prompt": [{"role": "system", "content": "You add."}, {"role": "user", "content": f"Calculate {a} + {b}."}],
         "answer": str(a + b), "tag": 0.25} for a in range(4) for b in range(5)]


@pytest.mark.timeout(300)
def test_user_reward_functions_train_and_report_per_reward_metrics(tiny_model, ray_local, tmp_path, monkeypatch):
    (tmp_path / "user_task_rewards.py").write_text(textwrap.dedent(USER_REWARDS))
    (tmp_path / "user_task_envs.py").write_text(USER_ENV.format(marker=str(tmp_path / "hung")))
    monkeypatch.syspath_prepend(str(tmp_path))  # the driver's path only: the actors get it from RolloutGroup
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    weights = {"exact_match": 1.0, "digit_frac": 2.0, "short": 0.5, "row_tag": 1.0, "saw_system": 0.5}
    conversational = ', format = "conversational"'
    rewards = ", ".join(f'{{fn = "{fn}", weight = {w}}}' if fn == "exact_match" else
                        f'{{fn = "user_task_rewards:{fn}", weight = {w}{conversational * (fn == "saw_system")}}}'
                        for fn, w in weights.items())
    cfg = tiny_run_config(tiny_model, tmp_path, "num_steps=2", "buffer.max_staleness=0", "rollout.max_tokens=12",
                          f"rollout.rewards=[{rewards}]", "data.type=dataset", f"data.path={data}",
                          "rollout.env.type=user_task_envs:HangsOnce", "rollout.env.step_timeout_s=2",
                          "rollout.env.max_episode_tokens=12", "rollout.env.max_hung_steps=0")
    t = Trainer(cfg, tmp_path / "run", tiny_model, load_problems(cfg.data, "train"), [])
    try:
        summary = t.run(progress=False)
    finally:
        t.shutdown()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in records if m["step"] >= 1]  # step 0: the start record
    assert len(steps) == 2 and summary["rollout/reward_failed_frac"] == 0.0
    # the hung step cost its worker, not the run: restarted (counted), the request's groups re-issued, none of the
    # hung request's episodes trained (no environment failure reached the buffer)
    assert (tmp_path / "hung").exists()
    assert summary["rollout/worker_restarts_hung"] == 1 and summary["rollout/worker_restarts"] == 1, summary
    assert summary["rollout/retried_groups"] >= 2, summary
    assert all(m["rollout/env_failed_frac"] == 0.0 for m in steps), steps
    trained = [g for x in (tmp_path / "run" / "trained_groups.jsonl").read_text().splitlines()
               for g in json.loads(x)["groups"]]
    assert len(trained) == 2 * cfg.prompts_per_step and len(set(trained)) == len(trained)
    for m in steps:
        per = {name: m[f"rollout/reward/{name}"] for name in weights}
        assert all(m[f"rollout/reward_failures/{name}"] == 0.0 for name in weights), m
        assert 0.0 <= per["digit_frac"] <= 1.0 and 0.0 <= per["short"] <= 1.0 and not math.isnan(per["short"])
        assert per["row_tag"] == 0.25 and per["saw_system"] == 1.0  # the row's column and messages in the actors
        # the exact_match entry is the strict check behind `correct` (computed by the learner from the samples)
        assert per["exact_match"] == pytest.approx(m["rollout/correct_frac"])
        # sync run: the step trains exactly the samples generated for it, so the learner's mean of the samples'
        # rewards equals the weighted sum of the functions' means (no None, no failures here)
        assert m["curation/groups_generated"] == cfg.prompts_per_step, m
        assert m["rollout/reward_mean"] == pytest.approx(sum(w * per[n] for n, w in weights.items()), abs=1e-6)
