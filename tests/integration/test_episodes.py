"""Multi-turn episodes on a real vLLM engine (tiny model, fp32) and the real learner scoring code.

Checked in a fresh process (vLLM keeps process state): the trained ids are exactly the sampled ids plus
each observation's ids; the learner's logprobs (`learner.step.response_logprobs`, HF fp32 model) on the
sampled tokens match the engine's behaviour logprobs; observation tokens are masked; the naive
re-tokenisation differs; an environment whose step raises and one whose step hangs fail their episode
only, counted, and the others go on; the rollout worker turns ``tool_math`` episodes into sample groups, and
single-turn tasks into one-step episodes with the same ids, logprobs and prompt as a plain engine request.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_SCRIPT = r"""
import json, threading, time, torch
from transformers import AutoModelForCausalLM
from buffer import GenerateRequest, Problem
from buffer.replay import ReplayBuffer
from learner.step import response_logprobs
from rollout.config import DataConfig, RolloutConfig
from rollout.envs import EnvConfig, Environment, StepResult
from rollout.episode import Episode, TurnEncoder, run_episodes
from rollout.worker import RolloutWorker

MODEL = {model!r}
HUNG = threading.Event()  # set when the script is done: the hung environment step returns then

class Echo(Environment):
    # three turns; each observation reports the length of the last answer; the 'bad' episodes misbehave
    def __init__(self, mode):
        super().__init__(Problem("p", "q", "a"), {{}}, None)
        self.mode, self.turn = mode, 0
    def reset(self, seed):
        return [{{"role": "user", "content": f"Calculate {{seed}} + 1."}}]
    def step(self, action):
        self.turn += 1
        if self.mode == "raise" and self.turn == 2:
            raise ValueError("broken environment")
        if self.mode == "hang" and self.turn == 2:
            HUNG.wait(60)  # hangs until the script is done (its thread would otherwise hold the exit for as long)
        return StepResult([{{"role": "user", "content": f"You wrote {{len(action)}} characters. Again."}}],
                          float(self.turn), self.turn == 3)

cfg = RolloutConfig(dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=512, max_tokens=12,
                    env=EnvConfig(type="tool_math", max_turns=3, max_episode_tokens=256, step_timeout_s=5.0))
buf = ReplayBuffer()
worker = RolloutWorker(cfg, DataConfig(), MODEL, 0, buf)
engine, tok = worker.engine, worker.engine.tokenizer
enc = TurnEncoder(tok)
env_cfg = EnvConfig(type="single_turn", max_turns=1).model_copy(update={{"max_turns": 3, "step_timeout_s": 5.0}})
seen = []  # (context, completion ids) of every engine call, to rebuild the episodes independently
def sample(prompts, n, max_tokens):
    outs = engine.generate(prompts, n, max_tokens, temperature=1.0, seed=len(seen))
    for p, g in zip(prompts, outs):
        seen.extend((tuple(p), tuple(c.token_ids)) for c in g)
    return outs, [[[0] * len(c.token_ids) for c in g] for g in outs]

groups = [[Episode(Echo("ok")) for _ in range(3)], [Episode(Echo("ok")), Episode(Echo("raise")), Episode(Echo("hang"))]]
t0 = time.monotonic()
run_episodes(groups, [7, 8], sample, enc, env_cfg, 12, 512)
seconds = time.monotonic() - t0
eps = [e for g in groups for e in g]
exact, naive_drift = [], []
for e in eps:
    # rebuild: sampled ids of each turn from the engine's outputs, observations encoded independently
    ids, ctx = [], list(e.prompt_ids)
    for t in range(len(e.texts)):
        comp = next(c for p, c in seen if list(p) == ctx and list(c) == e.response_ids[len(ids):len(ids) + len(c)])
        ids += comp
        if t + 1 < len(e.texts):
            obs = enc.observation_ids([{{"role": "user", "content": f"You wrote {{len(e.texts[t])}} characters. Again."}}],
                                      comp[-1] if comp else None)
            ids += obs
        ctx = list(e.prompt_ids) + ids
    exact.append(ids == e.response_ids)
    convo = [{{"role": "user", "content": tok.decode(e.prompt_ids)}}]
    msgs = [{{"role": "user", "content": "Calculate %d + 1." % (7 if e in groups[0] else 8)}}]
    for t, text in enumerate(e.texts):
        msgs.append({{"role": "assistant", "content": text}})
        if t + 1 < len(e.texts):
            msgs.append({{"role": "user", "content": f"You wrote {{len(text)}} characters. Again."}})
    naive = enc.encode(tok.apply_chat_template(msgs, tokenize=False))
    naive_drift.append(naive[:len(e.prompt_ids) + len(e.response_ids)] != e.prompt_ids + e.response_ids)

samples = [e.to_sample("p", f"g{{i}}", "a") for i, e in enumerate(eps)]
model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
errs = {{}}
for shared in (True, False):
    with torch.no_grad():
        lp, mask = response_logprobs(model, samples, "cpu", 1.0, shared_prefix=shared)
    beh = torch.zeros_like(lp)
    for i, s in enumerate(samples):
        beh[i, :len(s.behaviour_logprobs)] = torch.tensor(s.behaviour_logprobs)
    errs[str(shared)] = float(((lp - beh).abs() * mask).max())

res = worker.generate(GenerateRequest((Problem("train/0", "What is 2 + 3?", "5"), Problem("train/1", "What is 4 + 4?", "8")),
                                      ("k0", "k1"), (2, 2), 0, 5))
stored = [s for g in buf._groups for s in g]
print("RESULT", json.dumps({{
    "status": [e.status for e in eps], "errors": [e.error for e in eps], "turns": [len(e.texts) for e in eps],
    "finish": [e.finish_reason for e in eps],
    "turn_rewards": [e.turn_rewards for e in eps], "exact": exact, "naive_drift": naive_drift,
    "mask_counts": [(sum(s.loss_mask), len(s.loss_mask)) for s in samples],
    "lp_err": errs, "seconds": seconds,
    "worker": {{"samples": res.samples, "kept": list(res.kept_keys), "turns": res.turns, "stored": len(stored),
               "env_failures": res.env_failures, "statuses": [s.status for s in stored],
               "has_turn_rewards": all(len(s.turn_rewards) >= 1 for s in stored)}}}}), flush=True)
HUNG.set()
"""


def test_episodes_token_in_token_out_on_a_real_engine(tiny_model):
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(model=tiny_model)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    print(res)
    ok = [0, 1, 2, 3]
    # the environment ended these; one whose last turn was cut at its token budget is truncated
    assert [res["status"][i] for i in ok] == ["truncated" if res["finish"][i] == "length" else "completed" for i in ok]
    assert [res["turns"][i] for i in ok] == [3] * 4
    assert [res["turn_rewards"][i] for i in ok] == [[1.0, 2.0, 3.0]] * 4
    assert res["status"][4] == "failed" and "raised ValueError: broken environment" in res["errors"][4]
    assert res["status"][5] == "failed" and "step_timeout_s" in res["errors"][5]
    assert all(res["exact"])  # trained ids == sampled ids + observation ids, episode by episode
    assert any(res["naive_drift"][i] for i in ok)  # re-tokenising the conversation would have drifted
    for i in ok:
        trained, total = res["mask_counts"][i]
        assert 0 < trained < total  # observation tokens masked out, sampled tokens in
    assert res["mask_counts"][4][0] == 0 and res["mask_counts"][5][0] == 0  # failed episodes never trained on
    assert res["lp_err"]["True"] < 1e-3 and res["lp_err"]["False"] < 1e-3  # learner == engine on sampled tokens
    w = res["worker"]
    assert w["samples"] == 4 and w["stored"] == 4 and w["kept"] == ["k0", "k1"] and w["turns"] >= 4
    assert w["env_failures"] == 0 and w["has_turn_rewards"]


_SINGLE_TURN = r"""
import itertools, json
from buffer import GenerateRequest, Problem
from buffer.replay import ReplayBuffer
from rollout.config import DataConfig, RolloutConfig
from rollout.rewards import score_response
from rollout.tasks import encode_prompt
from rollout.worker import RolloutWorker

class Flaky(RolloutWorker):
    calls, fail_every = itertools.count(1), 3  # every 3rd reward call raises (calls come from several threads)
    @staticmethod
    def reward_fn(text, reference):
        if Flaky.fail_every and next(Flaky.calls) % Flaky.fail_every == 0:
            raise ValueError("unparsable")
        return score_response(text, reference)

MAX = 8
cfg = RolloutConfig(dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=512, max_tokens=MAX, group_size=4)
d, buf = DataConfig(), ReplayBuffer()
w = Flaky(cfg, d, {model!r}, 0, buf)
tok = w.engine.tokenizer
probs = [Problem(f"train/{{i}}", f"Calculate {{a}} + {{b}}.", str(a + b)) for i, (a, b) in enumerate([(2, 3), (4, 4), (1, 6)])]
prompts = [encode_prompt(tok, p.question, d.instruction, d.one_shot) for p in probs]
res = w.generate(GenerateRequest(tuple(probs), ("k0", "k1", "k2"), (4, 4, 4), 0, 5))
stored = [s for g in buf._groups for s in g]
raw = w.engine.generate(prompts, 4, MAX, 1.0, 1.0, 5)  # the same request straight on the engine
Flaky.fail_every = 0
evals = w.evaluate(probs, 0, MAX)
raw_greedy = w.engine.generate(prompts, 1, MAX, 0.0)
greedy = [score_response(g[0].text, p.answer)[1] for p, g in zip(probs, raw_greedy)]
tx = w.greedy_transcripts(probs, 0, MAX)
# held-out pass@k: greedy and sampled requests of one prompt in one engine call, each at its own temperature
mixed = w.engine.generate([prompts[0], prompts[0]], [1, 6], MAX, [0.0, 1.0])
pass_correct, pass_counts = w.evaluate_pass_k(probs, [True, False, True], 4, 0, MAX)
eos = tok.eos_token_id
print("RESULT", json.dumps({{
    "prompt_ok": [s.prompt_ids == prompts[i // 4] for i, s in enumerate(stored)],
    "same_tokens": [s.response_ids for s in stored] == [c.token_ids for g in raw for c in g],
    "same_logprobs": max(abs(a - b) for s, c in zip(stored, [c for g in raw for c in g])
                         for a, b in zip(s.behaviour_logprobs, c.logprobs)),
    "statuses": [s.status for s in stored],
    "expected": ["failed" if s.error else "truncated" if len(s.response_ids) == MAX and s.response_ids[-1] != eos
                 else "completed" for s in stored],
    "turn_rewards_ok": [s.turn_rewards == [s.reward] for s in stored],
    "failed_masks": [sum(s.loss_mask) for s in stored if s.status == "failed"],
    "errors": [s.error for s in stored if s.error],
    "reward_failures": res.reward_failures, "env_failures": res.env_failures, "turns": res.turns,
    "tokens": res.tokens, "sampled": sum(len(s.response_ids) for s in stored),
    "evals": evals, "greedy": greedy, "tx_turns": [t["turns"] for t in tx], "tx_correct": [t["correct"] for t in tx],
    "raw_greedy_texts": [[g[0].text] for g in raw_greedy],
    "mixed_greedy_ok": mixed[0][0].token_ids == raw_greedy[0][0].token_ids and len(mixed[1]) == 6,
    "mixed_sampled_differ": any(c.token_ids != raw_greedy[0][0].token_ids for c in mixed[1]),
    "pass_correct": pass_correct, "pass_counts": pass_counts}}))
"""


def test_single_turn_tasks_are_one_step_episodes_of_the_same_worker_path(tiny_sums_model):
    out = subprocess.run([sys.executable, "-c", _SINGLE_TURN.format(model=tiny_sums_model)], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    assert all(res["prompt_ok"]) and len(res["prompt_ok"]) == 12  # the data section's prompt, as before
    assert res["same_tokens"] and res["same_logprobs"] < 1e-6  # same ids and logprobs as one engine request
    assert res["statuses"] == res["expected"]  # a response cut at max_tokens is truncated, not completed
    assert all(res["turn_rewards_ok"])  # each sample is a one-turn episode
    assert res["reward_failures"] == 4 and res["env_failures"] == 0  # every 3rd of 12 reward calls raised
    assert res["failed_masks"] == [0] * 4 and all("reward function failed: raised ValueError" in e
                                                  for e in res["errors"])
    assert res["turns"] == 12 and res["tokens"] == res["sampled"]
    assert res["evals"] == res["greedy"] and len(res["evals"]) == 3
    assert res["tx_turns"] == res["raw_greedy_texts"] and res["tx_correct"] == res["evals"]  # the same greedy episodes
    # pass@k's samples ride in the greedy eval's engine call: the greedy answers stay those of a greedy-only call,
    # the others are sampled at the rollout temperature (6 samples of a tiny random model: not all the greedy one)
    assert res["mixed_greedy_ok"] and res["mixed_sampled_differ"]
    assert res["pass_correct"] == res["evals"] and len(res["pass_counts"]) == 2
    assert all(0 <= c <= 4 for c in res["pass_counts"])
