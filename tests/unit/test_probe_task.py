"""``scripts/probe_task.py`` probes a task the way the rollout worker plays it: a conversational dataset's own
messages with ``data.system_prompt`` put first, and the run's ``[[rollout.rewards]]`` (a user function, one of
them isolated in its own processes, with a data column) instead of the bare exact match. Real vLLM engine on
the tiny random model; the expected prompt ids and rewards are computed here independently of the worker."""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

from tiny_run import tiny_run_config

_spec = importlib.util.spec_from_file_location(
    "probe_task", Path(__file__).resolve().parents[2] / "scripts" / "probe_task.py")
probe_task = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe_task)

USER_REWARDS = '''
def digit_frac(completions, **kwargs):
    """The fraction of digits in each completion: varies on a random model."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

def row_tag(completions, tag, **kwargs):
    """A column of the data row."""
    return [float(t) for t in tag]
'''
SYSTEM = "You are a careful adder."
ROWS = [{"prompt": [{"role": "user", "content": "Reply briefly."}, {"role": "assistant", "content": "OK."},
                    {"role": "user", "content": f"Calculate {a} + {b}."}], "answer": str(a + b), "tag": a / 4}
        for a in range(4) for b in range(3)]


def _digit_frac(text: str) -> float:
    return sum(ch.isdigit() for ch in text) / max(len(text), 1)


@pytest.mark.timeout(120)
def test_probe_plays_the_workers_prompts_and_scores_with_the_runs_rewards(tiny_model, tmp_path, monkeypatch):
    from rollout.tasks import encode_messages, load_problems, prompt_messages
    from rollout.worker import RolloutWorker

    (tmp_path / "probe_user_rewards.py").write_text(textwrap.dedent(USER_REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    rewards = ('rollout.rewards=[{fn = "exact_match"}, {fn = "probe_user_rewards:digit_frac", weight = 2.0, '
               'isolate = true}, {fn = "probe_user_rewards:row_tag", weight = 0.5}]')
    cfg = tiny_run_config(tiny_model, tmp_path, rewards, "data.type=dataset", f"data.path={data}",
                          "data.eval_fraction=0.25", "data.eval_size=3", f"data.system_prompt={SYSTEM}",
                          "rollout.max_tokens=8")
    worker = RolloutWorker(cfg.rollout, cfg.data, tiny_model, 0, probe_task._Kept())
    try:
        out = probe_task.probe(cfg, worker, eval_problems=3, groups=3)
    finally:
        worker.rewards.close()
    dc, tok = cfg.data, worker.engine.tokenizer
    train = {p.prompt_id: p for p in load_problems(dc, "train")[:3]}
    groups = worker.buffer.groups
    assert [g[0].prompt_id for g in groups] == list(train) and all(len(g) == 4 for g in groups)
    for g in groups:
        p = train[g[0].prompt_id]
        expected = encode_messages(tok, prompt_messages(p, dc.instruction, dc.one_shot, SYSTEM))
        assert all(s.prompt_ids == expected for s in g)
        text = tok.decode(expected)
        assert SYSTEM in text and "Reply briefly." in text and p.question in text  # the row's whole conversation
    samples = [s for g in groups for s in g]
    assert all(s.status != "failed" for s in samples) and out["reward_failures"] == 0
    # the weighted total of the run's rewards, recomputed from the sampled texts
    totals = [float(s.correct) + 2.0 * _digit_frac(s.response_text) + 0.5 * train[s.prompt_id].columns["tag"]
              for s in samples]
    assert [s.reward for s in samples] == pytest.approx(totals, abs=1e-9)
    assert out["sampled_reward_mean"] == pytest.approx(sum(totals) / len(totals))
    assert out["reward/digit_frac"] == pytest.approx(sum(_digit_frac(s.response_text) for s in samples) / 12)
    assert out["reward/row_tag"] == pytest.approx(sum(train[s.prompt_id].columns["tag"] for s in samples) / 12)
    assert len({round(t, 9) for t in totals}) > 1  # the user rewards vary: not the exact match's constant 0
    mixed = sum(min(s.reward for s in g) < max(s.reward for s in g) for g in groups) / 3
    assert (out["groups"], out["n"], out["mixed_group_frac"]) == (3, 4, mixed)
    assert out["eval_problems"] == 3 and 0.0 <= out["greedy_accuracy"] <= 1.0
