"""Reward-model pools as Ray actors on the shared Ray session (`rollout.reward_models`): a tiny random
sequence-classification model and SmolLM2-135M-Instruct as a generative judge (vLLM, fp32), one server each.

Checked against independent references: the classifier's scores equal a plain transformers forward of each text
alone, the judge's scores equal the verdicts parsed from a plain transformers greedy generation of the same
prompts. A call past its timeout scores None, is counted, its items are aborted in the judge's engine (which is
left with no unfinished request), and the pool serves the next call. A pool grows and shrinks while calls go on,
none of them failing. A rollout worker (started by `RolloutGroup`, which hands it the pools through its environment)
scores its samples with the built-in ``reward_model:<name>`` reward and a user reward function that calls the judge
itself.
"""

from __future__ import annotations

import textwrap
import threading
import time

import pytest

from buffer import GenerateRequest, Problem
from rollout.config import DataConfig, RewardConfig, RolloutConfig
from rollout.reward_models import (ClassifierRewardModelConfig, JudgeRewardModelConfig, RewardModelPool,
                                   VerdictParser, reward_model, reward_models_env)

pytestmark = pytest.mark.integration

JUDGE_TEMPLATE = ("Question: {prompt}\nReference answer: {answer}\nStudent answer: {completion}\n"
                  "Rate the student answer from 0 to 10. Reply with the rating only.")
USER_REWARDS = '''
from rollout.reward_models import reward_model

def judged(prompts, completions, answer, **kwargs):
    """A user's reward function calling the judge pool itself: its rating / 10, None when it gave none."""
    return [None if v is None else v / 10 for v in reward_model("it_judge").score(prompts, completions, answer=answer)]
'''
QUESTIONS = [("What is 2 + 3?", "5", "5"), ("What is 2 + 3?", "5", "The answer is 7."),
             ("Calculate 12 - 4.", "8", "8"), ("Name a colour.", "red", "banana")]


class _AnyNode:
    """Placement for tests: Ray's default scheduling, nothing reserved."""

    def strategy(self, slot):
        return None

    def release(self, slot):
        pass


@pytest.fixture(scope="module")
def pools(tiny_model, ray_local, tmp_path_factory):
    """The two pools and a one-worker `RolloutGroup` (tiny model) whose rewards call them, started together."""
    import sys

    import ray

    from buffer.replay import ReplayBuffer
    from orchestrator.models import resolve_model_path
    from rollout.group import RolloutGroup
    from tiny_model import build_tiny_reward_model

    tmp = tmp_path_factory.mktemp("reward_models")
    rm_path = build_tiny_reward_model(tmp / "rm", num_labels=1)
    (tmp / "it_judge_rewards.py").write_text(textwrap.dedent(USER_REWARDS))
    sys.path.insert(0, str(tmp))  # the driver's path: the worker gets the dir from RolloutGroup
    t0 = time.monotonic()
    classifier = RewardModelPool(ClassifierRewardModelConfig(name="it_rm", model=rm_path, num_cpus=0.5, timeout_s=20),
                                 rm_path, _AnyNode(), wait=False)
    judge_path = resolve_model_path("smollm2-135m-instruct")
    judge = RewardModelPool(JudgeRewardModelConfig(
        name="it_judge", model=judge_path, num_cpus=1, timeout_s=20, template=JUDGE_TEMPLATE, pattern=r"(\d+)",
        max_tokens=4, dtype="float32", kv_cache_memory_bytes=32 << 20, max_model_len=512), judge_path, _AnyNode(),
        wait=False)
    buffer_name = f"it-rm-buffer-{time.time_ns()}"
    buffer = ray.remote(ReplayBuffer).options(name=buffer_name, num_cpus=0).remote()
    cfg = RolloutConfig(dtype="float32", kv_cache_memory_bytes=32 << 20, max_model_len=256, max_tokens=8,
                        group_size=2, num_cpus=0.5, reward_timeout_s=30.0,
                        rewards=[RewardConfig(fn="reward_model:it_rm"), RewardConfig(fn="it_judge_rewards:judged")])
    group = RolloutGroup(cfg, DataConfig(), tiny_model, buffer_name, _AnyNode(), startup_timeout_s=300,
                         env_vars=reward_models_env([classifier, judge]), wait=False)
    try:
        classifier.wait_up()
        judge.wait_up()
        group.wait_up()
        print(f"pools and rollout worker up in {time.monotonic() - t0:.1f} s")
        yield {"classifier": classifier, "judge": judge, "group": group, "buffer": buffer, "rm_path": rm_path,
               "judge_path": judge_path}
    finally:
        for slot in list(group.slots):
            group.release(slot)
        classifier.shutdown()
        judge.shutdown()
        ray.kill(buffer)
        sys.path.remove(str(tmp))


def _classifier_reference(path: str, prompts: list[str], completions: list[str]) -> list[float]:
    """Each (prompt, completion) as a chat alone through a plain transformers forward: the logit at its last token."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            text = tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                           tokenize=False)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            out.append(float(model.score(model.model(input_ids=ids).last_hidden_state[0, -1])[0]))
    return out


def test_classifier_pool_matches_a_plain_forward(pools):
    prompts, answers, completions = zip(*QUESTIONS)
    got = reward_model("it_rm").score(list(prompts), list(completions))
    ref = _classifier_reference(pools["rm_path"], prompts, completions)
    assert got == pytest.approx(ref, abs=1e-5)
    m = pools["classifier"].metrics()
    assert m["reward_model/it_rm/items"] == 4.0 and m["reward_model/it_rm/failed_items"] == 0.0, m


def test_judge_pool_matches_greedy_transformers_and_survives_a_timeout(pools):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts, answers, completions = map(list, zip(*QUESTIONS))
    client = reward_model("it_judge")
    got = client.score(prompts, completions, answer=answers)

    # the reference: one greedy transformers generation over the same prompts, left-padded into one batch (the
    # attention mask keeps the pads out; 4 forwards of a batch of 4 instead of 16 single ones)
    path = pools["judge_path"]
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    chats = [tok.apply_chat_template([{"role": "user", "content": JUDGE_TEMPLATE.format(prompt=p, answer=a,
                                                                                         completion=c)}],
                                     add_generation_prompt=True, tokenize=False)
             for p, a, c in zip(prompts, answers, completions)]
    enc = tok(chats, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    parse = VerdictParser(r"(\d+)")
    assert got == [parse(t) for t in texts], texts
    assert sum(v is not None for v in got) >= 2, texts  # the judge answers with ratings, not only prose

    # a call past its timeout: every item None and counted; the items that were generating are aborted in the
    # judge's engine (not generated for no one), the others skipped; the pool goes on serving
    before, server_before = client.stats(), pools["judge"].stats()
    many = 8 * prompts
    values, why = client.score_explained(many, 8 * completions, timeout_s=0.02, answer=8 * answers)
    assert values == [None] * len(many) and why == "timed out after 0.02 s"
    after = client.stats()
    assert after["timeouts"] - before["timeouts"] == len(many)
    assert after["failed_items"] - before["failed_items"] == len(many)
    deadline = time.monotonic() + 60
    while True:  # until the server has accounted for every item of the abandoned call
        st = pools["judge"].stats()
        if st["items"] + st["expired"] - server_before["items"] - server_before["expired"] >= len(many):
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.05)
    assert st["aborted"] - server_before["aborted"] >= 1, st  # a batch had started: aborted, not finished
    assert st["engine_unfinished"] == 0 and st["queued"] == 0, st
    assert client.score(prompts, completions, answer=answers) == got
    st = pools["judge"].stats()
    assert st["workers"] == 1 and st["items"] >= 2 * len(prompts) and st["errors"] == 0, st


def test_a_pool_grows_and_shrinks_while_calls_go_on(pools):
    """`orchestrator.scaling.scale_pool` (what the run's scaler does for ``relayrl scale --reward-model``) adds a
    classifier server while a thread keeps calling, then removes it: the new server takes calls, and a call whose
    chunk went to the removed server is resent to the other within its deadline, so no call fails."""
    import ray

    from orchestrator.scaling import scale_pool

    pool, client = pools["classifier"], reward_model("it_rm")
    prompts, _, completions = map(list, zip(*QUESTIONS))
    ref = client.score(prompts, completions)
    calls, stop = [], threading.Event()

    def keep_calling():
        while not stop.is_set():
            calls.append(client.score(prompts, completions))

    before = client.stats()
    caller = threading.Thread(target=keep_calling, daemon=True)
    caller.start()
    try:
        client.refresh_s = 0.0  # look the servers up at every call: the new one is used at once
        scale_pool(pool, 2)
        assert sorted(pool.slots) == [0, 1]
        # two chunks of batch_size 16, each to the server with the fewest calls in flight from this process
        assert client.score(8 * prompts, 8 * completions) == pytest.approx(8 * ref, abs=1e-5)
        assert ray.get(pool.slots[1].stats.remote(), timeout=30)["items"] > 0  # the new server took calls
        client.refresh_s = 3600.0  # no look-up until a call finds a server dead: the removed one is still listed,
        retried = client.stats()["retried"]  # so the next chunk sent to it (the thread's or this call's) is resent
        scale_pool(pool, 1)
        assert sorted(pool.slots) == [0]
        assert client.score(8 * prompts, 8 * completions) == pytest.approx(8 * ref, abs=1e-5)
        assert client.stats()["retried"] - retried >= len(prompts), client.stats()
    finally:
        stop.set()
        caller.join(60)
        del client.refresh_s  # the class default again
    assert calls and all(c == pytest.approx(ref, abs=1e-5) for c in calls), calls
    after = client.stats()
    assert after["failed_items"] == before["failed_items"] and after["server_errors"] == before["server_errors"]
    assert pool.metrics()["reward_model/it_rm/workers"] == 1.0


def test_a_rollout_worker_scores_with_both_pools(pools):
    import ray

    group, buffer = pools["group"], pools["buffer"]
    req = GenerateRequest((Problem("train/0", "What is 2 + 3?", "5"), Problem("train/1", "Calculate 4 + 4.", "8")),
                          ("rm0", "rm1"), (2, 2), 0, 7)
    res = ray.get(group.generate_remote(0, req), timeout=120)
    group.done(0)
    terms = {name: (total, applied, failed) for name, total, applied, failed in res.reward_terms}
    assert res.samples == 4 and res.reward_failures == 0, res
    assert terms["it_rm"][1:] == (4, 0) and terms["judged"][2] == 0, terms
    samples = [s for g in ray.get(buffer.peek_groups.remote(["rm0", "rm1"]), timeout=60) for s in g]
    questions = {"rm0": "What is 2 + 3?", "rm1": "Calculate 4 + 4."}
    ref = _classifier_reference(pools["rm_path"], [questions[s.group_id] for s in samples],
                                [s.response_text for s in samples])
    # each sample's reward = classifier score + the judge's rating / 10 (0 where it gave none)
    assert terms["it_rm"][0] == pytest.approx(sum(ref), abs=1e-4)
    assert sum(s.reward for s in samples) == pytest.approx(sum(ref) + terms["judged"][0], abs=1e-4)
