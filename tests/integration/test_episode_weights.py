"""Episodes in a real rollout worker (vLLM, tiny model, fp32) playing textarena's GuessTheNumber: weights pushed
while an episode is between turns serve its next turn, and each token's policy version names the weights
that sampled it (checked against HF models of both versions); ``rollout.env.episode_timeout_s`` ends slow
episodes as truncated. Run in a fresh process (vLLM keeps process state)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_SCRIPT = r"""
import json, time, torch
from transformers import AutoModelForCausalLM
from buffer import GenerateRequest, Problem
from buffer.replay import ReplayBuffer
from base.weight_buckets import serialize_buckets
from rollout.config import DataConfig, RolloutConfig
from rollout.envs import EnvConfig, Environment, StepResult
from rollout.envs.base import ENVIRONMENTS
from rollout.envs.textarena_env import TextArena
from rollout.worker import RolloutWorker

MODEL = {model!r}
old = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
new = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
torch.manual_seed(0)
with torch.no_grad():
    for p in new.parameters():
        p.add_(0.05 * torch.randn_like(p))
buckets = serialize_buckets(iter(new.named_parameters()), 64 << 20)
env = EnvConfig(type="textarena", max_turns=2, max_episode_tokens=400, step_timeout_s=30.0,
                options={{"env_kwargs": {{"max_turns": 2}}}})
cfg = RolloutConfig(dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=1024, max_tokens=8, env=env)
buf = ReplayBuffer()
worker = RolloutWorker(cfg, DataConfig(), MODEL, 0, buf)
pushed = []

class PushOnFirstStep(TextArena):  # the real game; its first step also stages version 1 (a learner's push)
    def step(self, action):
        if not pushed:
            pushed.append(worker.receive_weights(1, buckets))
        return super().step(action)

ENVIRONMENTS["textarena"] = PushOnFirstStep
res = worker.generate(GenerateRequest((Problem("train/0", "", ""), Problem("train/1", "", "")), ("k0", "k1"), (2, 2), 0, 5))
samples = [s for g in buf._groups for s in g]

def logprobs(model, s):
    ids = torch.tensor([s.prompt_ids + s.response_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    tgt = ids[0, 1:]
    return lp.gather(-1, tgt[:, None])[:, 0][len(s.prompt_ids) - 1:].tolist()

err = {{"v0_old": 0.0, "v1_new": 0.0, "v1_old": 0.0}}
for s in samples:
    lo, ln = logprobs(old, s), logprobs(new, s)
    for i, (m, v, b) in enumerate(zip(s.loss_mask, s.policy_versions, s.behaviour_logprobs)):
        if m and v == 0:
            err["v0_old"] = max(err["v0_old"], abs(b - lo[i]))
        if m and v == 1:
            err["v1_new"] = max(err["v1_new"], abs(b - ln[i]))
            err["v1_old"] = max(err["v1_old"], abs(b - lo[i]))
turns = []
for s in samples:  # the policy versions of each turn's sampled tokens, in order
    runs, prev = [], 0
    for m, v in zip(s.loss_mask, s.policy_versions):
        if m and prev == 0:
            runs.append([])
        if m:
            runs[-1].append(v)
        prev = m
    turns.append([sorted(set(r)) for r in runs])

held_out = [Problem(f"eval/{{i}}", "", "") for i in range(3)]
evals = [worker.evaluate(held_out, 1, 8) for _ in range(2)]  # greedy episodes: one per problem, repeatable

# episode_timeout_s: an environment that never ends and whose every step takes 1 s; 6 turns allowed, 2.5 s
class Slow(Environment):
    def reset(self, seed):
        return [{{"role": "user", "content": "Count with me."}}]
    def step(self, action):
        time.sleep(1.0)
        return StepResult([{{"role": "user", "content": "Go on."}}], 0.0, False)

ENVIRONMENTS["textarena"] = Slow
worker.env_cfg = env.model_copy(update={{"max_turns": 6, "episode_timeout_s": 2.5}})  # the worker's episode settings
buf._groups.clear()
t0 = time.monotonic()
worker.generate(GenerateRequest((Problem("train/2", "", ""),), ("k2",), (2,), 1, 5))
slow_seconds = time.monotonic() - t0
slow_samples = [s for g in buf._groups for s in g]
print("RESULT", json.dumps({{
    "pushed": pushed, "version": worker.version, "mixed": res.mixed_version_samples, "turns": turns, "err": err,
    "statuses": [s.status for s in samples], "slow": [(s.status, s.error, len(s.turn_rewards)) for s in slow_samples],
    "slow_trained": [sum(s.loss_mask) for s in slow_samples], "slow_seconds": slow_seconds, "evals": evals}}))
"""


def test_weights_change_between_turns_and_episode_timeout(tiny_model):
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(model=tiny_model)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    print(res)
    assert res["pushed"][0]["applied"] == 0.0 and res["version"] == 1  # staged mid-episode, loaded between turns
    assert res["statuses"] == ["completed"] * 4 or set(res["statuses"]) <= {"completed", "truncated"}
    assert res["turns"] == [[[0], [1]]] * 4 and res["mixed"] == 4  # turn 1 by version 0, turn 2 by version 1
    # each token's behaviour logprob is the one of the weights its version names (fp32: ~1e-4) ...
    assert res["err"]["v0_old"] < 1e-3 and res["err"]["v1_new"] < 1e-3
    assert res["err"]["v1_old"] > 1e-2  # ... and the versions' weights differ enough to tell them apart
    for status, error, turns in res["slow"]:  # 1 s per step, 2.5 s per episode: ended after turn 3 of 6
        assert status == "truncated" and "episode time limit of 2.5 s" in error and 2 <= turns <= 3
    assert all(n > 0 for n in res["slow_trained"])  # a truncated episode is still trained on
    assert res["slow_seconds"] < 30
    assert res["evals"][0] == res["evals"][1] and len(res["evals"][0]) == 3  # held-out: one greedy game each
