"""Reward-model pools without Ray (`rollout.reward_models`): judge templates and verdict parsing, the config's
rules, a server's batching and deadlines, and an in-process classifier pool on a tiny random model, whose scores
must equal a plain transformers forward of each text alone (no padding) and reach a run's reward through
``fn = "reward_model:<name>"``."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from orchestrator.config import ConfigError, load_config
from rollout.config import RewardConfig
from rollout.reward_models import (ENV_VAR, ClassifierRewardModelConfig, RewardModelPool, RewardModelServer,
                                   VerdictParser, label_index, render_template, reward_model, template_fields)
from rollout.rewards import RewardSet


# ---- templates -----------------------------------------------------------------------------------------------
def test_template_fills_prompt_completion_and_columns_and_keeps_literal_braces():
    t = "Q: {prompt}\nA: {completion}\nRef: {answer} {{not a field}}"
    assert template_fields(t) == ("prompt", "completion", "answer")
    got = render_template(t, "2+2?", "4 {x}", {"answer": 4, "unused": "u"})
    assert got == "Q: 2+2?\nA: 4 {x}\nRef: 4 {not a field}"  # a value's braces stay as they are


def test_template_errors_name_the_field():
    with pytest.raises(ValueError, match=r"\['solution'\] not given.*'answer', 'completion', 'prompt'"):
        render_template("{completion} vs {solution}", "p", "c", {"answer": "a"})
    for bad in ("{prompt.__class__}", "{0}", "{}", "{answer[0]}", "{completion!r}", "{completion:>9}"):
        with pytest.raises(ValueError, match="not a plain name"):
            template_fields(bad)
    with pytest.raises(ValueError, match="malformed"):
        template_fields("{completion")


# ---- verdicts ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, pattern, verdicts, match, expected", [
    ("Rating: 7/10", r"(\d+)", {}, "first", 7.0),
    ("7 out of 10", r"(\d+)", {}, "last", 10.0),
    ("Score = -2.5.", r"(?i)score\s*=\s*(-?\d+(?:\.\d+)?)", {}, "first", -2.5),
    ("1,200 points", r"([\d,]+) points", {}, "first", 1200.0),
    ("Yes, it is correct.", r"(?i)\b(yes|no)\b", {"yes": 1.0, "no": 0.0}, "first", 1.0),
    ("no", r"(?i)\b(yes|no)\b", {"YES": 1.0, "No ": 0.0}, "first", 0.0),  # keys compared stripped, lower-case
    ("Maybe.", r"(?i)\b(yes|no)\b", {"yes": 1.0, "no": 0.0}, "first", None),  # no match
    ("Verdict: unsure", r"Verdict: (\w+)", {"good": 1.0}, "first", None),  # not in the mapping
    ("Rating: inf", r"Rating: (\w+)", {}, "first", None),  # not finite
    ("Rating: high", r"Rating: (\w+)", {}, "first", None),  # not a number
])
def test_verdict_parser(text, pattern, verdicts, match, expected):
    assert VerdictParser(pattern, verdicts, match)(text) == expected


def test_verdict_parser_needs_one_capture_group():
    for bad in (r"\d+", r"(a)(b)"):
        with pytest.raises(ValueError, match="exactly one"):
            VerdictParser(bad)
    with pytest.raises(ValueError, match="not a regular expression"):
        VerdictParser("(unclosed")
    assert VerdictParser(r"(?:score|rating): (\d)")("rating: 3") == 3.0


# ---- config --------------------------------------------------------------------------------------------------
JUDGE = 'reward_models=[{name = "judge", type = "judge", model = "m", timeout_s = 5}]'


def test_a_reward_names_a_pool_whose_timeout_fits_the_reward_call():
    cfg = load_config(None, [JUDGE, 'rollout.rewards=[{fn = "exact_match"}, '
                             '{fn = "reward_model:judge", weight = 0.5}]'])
    assert [r.name for r in cfg.rollout.rewards] == ["exact_match", "judge"]
    assert cfg.reward_models[0].type == "judge" and cfg.reward_models[0].timeout_s == 5
    with pytest.raises(ConfigError, match=r"'reward_model:jduge' names no \[\[reward_models\]\] entry.*'judge'"):
        load_config(None, [JUDGE, 'rollout.rewards=[{fn = "reward_model:jduge"}]'])
    with pytest.raises(ConfigError, match=r"timeout_s = 5 is not below rollout.reward_timeout_s = 5"):
        load_config(None, [JUDGE, 'rollout.rewards=[{fn = "reward_model:judge"}]', "rollout.reward_timeout_s=5"])
    with pytest.raises(ConfigError, match=r"name\(s\) \['judge'\] given to more than one pool"):
        load_config(None, ['reward_models=[{name = "judge", model = "a"}, {name = "judge", model = "b"}]'])


def test_judge_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="no {completion} field"):
        load_config(None, ['reward_models=[{name = "j", type = "judge", model = "m", template = "Is {prompt} ok?"}]'])
    with pytest.raises(ConfigError, match="2 capture groups"):
        load_config(None, ['reward_models=[{name = "j", type = "judge", model = "m", pattern = "(a)|(b)"}]'])
    with pytest.raises(ConfigError, match="not a plain name"):
        load_config(None, ['reward_models=[{name = "c", model = "m", template = "{completion.x}"}]'])
    with pytest.raises(ConfigError, match="tag 'regression'.*'classifier', 'judge'"):
        load_config(None, ['reward_models=[{name = "c", model = "m", type = "regression"}]'])


def test_reward_model_bundles_count_in_the_runs_resources():
    from orchestrator.placement import run_bundles, shortfall

    cfg = load_config(None, ['reward_models=[{name = "rm", model = "m", num_workers = 2, num_cpus = 3, '
                             'resources = {judge_node = 1}}]'])
    assert run_bundles(cfg)[-2:] == [{"CPU": 3.0, "judge_node": 1.0}] * 2
    missing = shortfall(cfg, {"CPU": 4.0})
    assert any("reward model rm: 2 x 3" in m and "but the Ray cluster has 4" in m for m in missing), missing
    assert any(m.startswith("2 judge_node") for m in missing), missing


def test_label_index():
    class Cfg:
        num_labels, id2label = 2, {0: "bad", 1: "good"}

    assert label_index(Cfg, "good") == 1 and label_index(Cfg, 0) == 0
    with pytest.raises(ValueError, match="2 labels.*set label"):
        label_index(Cfg, None)
    with pytest.raises(ValueError, match="'great' is not one of the model's labels"):
        label_index(Cfg, "great")
    with pytest.raises(ValueError, match="label = 2 is out of range"):
        label_index(Cfg, 2)


# ---- a server's batching -------------------------------------------------------------------------------------
class _Recorder:
    """A scorer that records its batches: the score is the completion's length (slow: ``delay_s`` per batch)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s

    def score_batch(self, items):
        time.sleep(self.delay_s)
        self.batches.append(len(items))
        if any(it["completion"] == "boom" for it in items):
            raise RuntimeError("model exploded")
        return [float(len(it["completion"])) for it in items]


def _server(scorer, **cfg) -> RewardModelServer:
    """The real server (its batching and deadlines) around a recording scorer."""

    class Recording(RewardModelServer):
        def make_scorer(self, cfg, model_path):
            return scorer

    return Recording(ClassifierRewardModelConfig(name="rec", model="m", **cfg), "/tmp", 0)


def test_server_batches_concurrent_calls_up_to_batch_size():
    rec = _Recorder()
    server = _server(rec, batch_size=4, batch_wait_s=0.05)

    async def calls():
        far = time.time() + 60
        return await asyncio.gather(*[server.score([{"prompt": "p", "completion": "x" * (i + j)}
                                                    for j in range(k)], far) for i, k in enumerate((1, 2, 3, 1))])

    out = asyncio.run(calls())
    assert out == [[0.0], [1.0, 2.0], [2.0, 3.0, 4.0], [3.0]]  # each caller gets its own items back, in order
    assert rec.batches == [4, 3]  # 7 items of 4 concurrent calls: two batches of at most batch_size
    assert server.stats()["items"] == 7 and server.stats()["batches"] == 2


def test_server_skips_expired_items_and_fails_a_raising_batch_only():
    rec = _Recorder(delay_s=0.2)
    server = _server(rec, batch_size=2, batch_wait_s=0.0)

    async def calls():
        now = time.time()
        return await asyncio.gather(server.score([{"prompt": "p", "completion": "ab"}] * 2, now + 60),
                                    server.score([{"prompt": "p", "completion": "late"}], now + 0.05),
                                    server.score([{"prompt": "p", "completion": "boom"}], now + 60),
                                    server.score([{"prompt": "p", "completion": "abc"}], now + 60))

    out = asyncio.run(calls())
    # the first batch (ab, ab) runs 0.2 s: the 'late' call's deadline passes meanwhile, so it is skipped, not
    # scored; the next batch (boom, abc) raises and fails its two items only
    assert out == [[2.0, 2.0], [None], [None], [None]], out
    st = server.stats()
    assert (st["items"], st["batches"], st["expired"], st["errors"], st["unscored"]) == (4, 2, 1, 2, 2), st
    assert "model exploded" in st["last_error"] and rec.batches == [2, 2]
    out = asyncio.run(server.score([{"prompt": "p", "completion": "abcd"}], time.time() + 60))
    assert out == [4.0]  # the server goes on after a failed batch


class _Abortable:
    """A scorer that generates like a judge: one "engine step" every 10 ms for ``steps`` steps, polling
    ``abandoned()`` before each; items it names are dropped (None) and recorded, the others score 1.0."""

    abortable = True

    def __init__(self, steps: int = 100) -> None:
        self.steps, self.aborted_at = steps, {}

    def score_batch(self, items, abandoned):
        live = set(range(len(items)))
        for step in range(self.steps):
            for i in set(abandoned()) & live:
                live.discard(i)
                self.aborted_at[items[i]["completion"]] = step
            if not live:
                break
            time.sleep(0.01)
        return [1.0 if i in live else None for i in range(len(items))]


def test_server_names_the_items_whose_caller_gave_up_to_an_abortable_scorer():
    """A judge's batch is told, while it generates, which items nobody waits for any more (deadline passed, or
    the call cancelled when its caller timed out), so it can abort them in its engine; the others finish."""
    scorer = _Abortable()
    server = _server(scorer, batch_size=8, batch_wait_s=0.0)

    async def calls():
        now = time.time()
        cancelled = asyncio.ensure_future(server.score([{"prompt": "p", "completion": "cancelled"}], now + 60))
        near = server.score([{"prompt": "p", "completion": "near"}], now + 0.15)
        far = server.score([{"prompt": "p", "completion": "far"}], now + 60)

        async def cancel_soon():
            await asyncio.sleep(0.3)
            cancelled.cancel()
        results = await asyncio.gather(near, far, cancel_soon())
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        return results[:2]

    assert asyncio.run(calls()) == [[None], [1.0]]
    # one batch of three; 'near' dropped once its deadline passed (~15 steps), 'cancelled' once cancelled (~30)
    assert set(scorer.aborted_at) == {"near", "cancelled"}, scorer.aborted_at
    assert 8 <= scorer.aborted_at["near"] < scorer.aborted_at["cancelled"] < 60, scorer.aborted_at
    assert server.stats()["batches"] == 1 and server.stats()["queued"] == 0


# ---- an in-process classifier pool ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> str:
    from tiny_model import build_tiny_reward_model

    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny_rm"), num_labels=2)


def _reference(path: str, texts: list[str], label: int) -> list[float]:
    """Each text alone through a plain transformers forward: the logit of ``label`` at the last token."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
            out.append(float(model.score(hidden)[label]))
    return out


def test_classifier_pool_scores_equal_an_unpadded_forward_and_feed_a_reward(tiny_rm):
    cfg = ClassifierRewardModelConfig(name="tiny_rm_unit", model=tiny_rm, label="good", batch_size=3,
                                      template="Question: {prompt}\nAnswer: {completion}\nReference: {answer}")
    pool = RewardModelPool(cfg, tiny_rm, in_process=True)
    try:
        prompts = ["Calculate 1 + 2.", "What is 40 - 7?", "Calculate 5 + 5.", "What is 9 - 9?"]
        completions = ["3", "The answer is 33, shown with a much longer explanation of the steps.", "10", ""]
        answers = ["3", "33", "10", "0"]
        got = reward_model("tiny_rm_unit").score(prompts, completions, answer=answers, unused=[1, 2, 3, 4])
        texts = [f"Question: {p}\nAnswer: {c}\nReference: {a}" for p, c, a in zip(prompts, completions, answers)]
        ref = _reference(tiny_rm, texts, 1)
        assert got == pytest.approx(ref, abs=1e-5)  # padded batches of 3 + 1 == each text alone
        assert len(set(round(v, 6) for v in got)) == 4  # a random model still tells these texts apart
        assert pool.metrics()["reward_model/tiny_rm_unit/items"] == 4.0

        # the built-in reward: one completion at a time through a run's RewardSet, weighted
        rs = RewardSet([RewardConfig(fn="reward_model:tiny_rm_unit", weight=2.0)], timeout_s=30.0)
        score = rs.score(prompts[1], completions[1], answers[1])
        assert score.error == "" and score.terms["tiny_rm_unit"] == pytest.approx(ref[1], abs=1e-5)
        assert score.reward == pytest.approx(2.0 * ref[1], abs=1e-5)

        with pytest.raises(ValueError, match=r"needs column\(s\) \['answer'\]"):
            reward_model("tiny_rm_unit").score(prompts, completions)
        with pytest.raises(ValueError, match="3 prompts for 4 completions"):
            reward_model("tiny_rm_unit").score(prompts[:3], completions, answer=answers)
    finally:
        pool.shutdown()
    with pytest.raises(ValueError, match="no reward model pool named 'tiny_rm_unit'"):
        reward_model("tiny_rm_unit")


def test_classifier_probability_and_chat_template(tiny_rm):
    import torch

    pool = RewardModelPool(ClassifierRewardModelConfig(name="p", model=tiny_rm, label=1, output="probability"),
                           tiny_rm, in_process=True)
    try:
        got = pool.client.score(["Calculate 1 + 2."], [[{"role": "assistant", "content": "3"}]])  # conversational
        server = pool.slots[0]
        text = server.scorer.tokenizer.apply_chat_template([{"role": "user", "content": "Calculate 1 + 2."},
                                                            {"role": "assistant", "content": "3"}], tokenize=False)
        assert text.startswith("<|im_start|>user\nCalculate 1 + 2.<|im_end|>\n<|im_start|>assistant\n3")
        logits = torch.tensor([_reference(tiny_rm, [text], i)[0] for i in (0, 1)])
        assert got[0] == pytest.approx(float(torch.softmax(logits, 0)[1]), abs=1e-5)
    finally:
        pool.shutdown()


def test_a_worker_process_finds_the_pools_through_its_environment(monkeypatch):
    spec = {"name": "env_judge", "prefix": "relayrl-rm-x-env_judge", "timeout_s": 2.5, "batch_size": 8,
            "fields": ["prompt", "completion", "answer"]}
    monkeypatch.setenv(ENV_VAR, json.dumps([spec]))
    client = reward_model("env_judge")
    assert (client.prefix, client.timeout_s, client.batch_size, client.fields) == (
        "relayrl-rm-x-env_judge", 2.5, 8, ("prompt", "completion", "answer"))
    with pytest.raises(ValueError, match=r"no reward model pool named 'other'.*'env_judge'"):
        reward_model("other")
