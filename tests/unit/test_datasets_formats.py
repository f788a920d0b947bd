"""Datasets the way users hold them (`rollout.tasks`): TRL's standard and conversational formats from
save_to_disk dirs and jsonl / json / parquet / csv files, every extra column reaching reward functions and
environments, the system prompt and template rendered with a real tokenizer's chat template, the held-out
split as a seeded disjoint fraction, and problems that survive pickling and checkpoint JSON."""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from buffer import GenerateRequest, Problem
from orchestrator.checkpoint import incompatible_fields
from orchestrator.config import load_config
from rollout.config import DataConfig, RewardConfig
from rollout.envs import EnvConfig, make_environment
from rollout.envs.builtin import SingleTurn
from rollout.rewards import RewardSet, reward_columns
from rollout.tasks import build_messages, encode_messages, load_problems, prompt_messages
from rollout.worker import RolloutWorker

ROWS = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1), "difficulty": i % 3, "source": f"s{i}"}
        for i in range(10)]
CHAT = [{"prompt": [{"role": "system", "content": "You add."}, {"role": "user", "content": f"{i} + 2?"}],
         "solution": str(i + 2), "max_chars": 10 + i} for i in range(6)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny test model's locally trained tokenizer and ChatML template (tests/tiny_model.py)."""
    from tiny_model import build_tiny_model
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tok")))


def _dataset_cfg(path, **kw) -> DataConfig:
    return DataConfig(type="dataset", path=str(path), **kw)


def test_every_source_format_gives_the_same_problems(tmp_path):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(ROWS)
    sources = {"jsonl": _jsonl(tmp_path / "d.jsonl", ROWS), "json": str(tmp_path / "d.json"),
               "parquet": str(tmp_path / "d.parquet"), "csv": str(tmp_path / "d.csv"),
               "disk": str(tmp_path / "disk"), "dict": str(tmp_path / "dict")}
    (tmp_path / "d.json").write_text(json.dumps(ROWS))  # one JSON array of records
    ds.to_parquet(sources["parquet"])
    ds.to_csv(sources["csv"], index=False)
    ds.save_to_disk(sources["disk"])
    DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(sources["dict"])
    got = {k: load_problems(_dataset_cfg(p), "train") for k, p in sources.items()}
    want = [Problem(f"train/{i}", r["prompt"], r["answer"], (), {k: v for k, v in r.items() if k != "prompt"})
            for i, r in enumerate(ROWS)]
    for kind, problems in got.items():
        if kind == "csv":  # csv has no types: "2" is read back as the number 2
            assert [(p.prompt_id, p.question, p.answer) for p in problems] == \
                   [(p.prompt_id, p.question, p.answer) for p in want]
            assert problems[3].columns == {"answer": 4, "difficulty": 0, "source": "s3"}
        else:
            assert problems == want, kind
    # a DatasetDict dir: data.split for training, data.eval_split for the held-out problems
    cfg = _dataset_cfg(sources["dict"], eval_path=sources["dict"])
    assert [p.prompt_id for p in load_problems(cfg, "eval")] == ["eval/0", "eval/1", "eval/2"]
    with pytest.raises(ValueError, match=r"splits \['test', 'train'\], not 'validation': set data.eval_split"):
        load_problems(cfg.model_copy(update={"eval_split": "validation"}), "eval")
    # old configs say type = "jsonl": the same source
    assert load_problems(DataConfig(type="jsonl", path=sources["jsonl"]), "train") == want
    assert len(load_problems(_dataset_cfg(sources["jsonl"], train_size=4), "train")) == 4


def test_bad_sources_and_columns_fail_in_one_line_naming_value_and_fix(tmp_path, monkeypatch):
    import datasets

    good = _jsonl(tmp_path / "good.jsonl", ROWS)
    (tmp_path / "d.txt").write_text("x")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header_only.csv").write_text("prompt,answer\n")
    datasets.Dataset.from_dict({"prompt": ["q"], "answer": ["a"], "blob": [b"\x00\x01"]}).save_to_disk(tmp_path / "bin")
    _jsonl(tmp_path / "reserved.jsonl", [{"prompt": "q", "answer": "a", "completions": "x"}])
    _jsonl(tmp_path / "chat_bad.jsonl", [{"prompt": [{"role": "user", "text": "hi"}], "answer": "a"}])
    (tmp_path / "not_saved").mkdir()
    cases = [
        (_dataset_cfg(tmp_path / "d.txt"), ValueError, r"unknown format .\.txt.; use a \.jsonl, \.json, \.parquet"),
        (_dataset_cfg(tmp_path / "empty.csv"), ValueError, r"empty\.csv' is an empty file"),
        (_dataset_cfg(tmp_path / "header_only.csv"), ValueError, r"header_only\.csv' has no rows"),
        (_dataset_cfg(tmp_path / "missing.parquet"), FileNotFoundError, r"missing\.parquet' does not exist"),
        (_dataset_cfg(good, prompt_field="question"), ValueError,
         r"no column 'question' \(columns: prompt, answer, difficulty, source\): set data\.prompt_field"),
        (_dataset_cfg(good, answer_field="solution"), ValueError, r"no column 'solution' .*set data\.answer_field"),
        (_dataset_cfg(tmp_path / "bin"), ValueError, r"column 'blob' holds Value\('binary'\), not JSON .*cast it"),
        (_dataset_cfg(tmp_path / "reserved.jsonl"), ValueError, r"column 'completions'.*rename it"),
        (_dataset_cfg(tmp_path / "chat_bad.jsonl"), ValueError, r"row 0: a conversational prompt's messages need"),
        (_dataset_cfg(good, template="Solve: {question}"), ValueError,
         r"data\.template 'Solve: \{question\}' names column 'question', which .* row 0 lacks"),
        (_dataset_cfg(tmp_path / "not_saved"), ValueError, r"a dir that datasets' save_to_disk did not write"),
        (_dataset_cfg(good, eval_fraction=0.95), ValueError, r"eval_fraction = 0\.95 of .* 10 rows leaves none"),
    ]
    for cfg, exc, pattern in cases:
        with pytest.raises(exc, match=pattern) as e:
            load_problems(cfg, "eval" if cfg.eval_fraction else "train")
        assert "\n" not in str(e.value), str(e.value)
    # a hub name that is not cached, offline: the error says how to bring it
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"data\.path = 'someorg/no_such_dataset' is no local file or dir, and the "
                       r"hub dataset could not be loaded .*save_to_disk\(DIR\) and set data\.path = DIR") as e:
        load_problems(_dataset_cfg("someorg/no_such_dataset"), "train")
    assert "\n" not in str(e.value)
    # config errors
    with pytest.raises(ValidationError, match=r"data\.eval_path \('e\.jsonl'\) and data\.eval_fraction \(0\.2\) "
                       r"are both set: choose one"):
        _dataset_cfg(good, eval_path="e.jsonl", eval_fraction=0.2)
    with pytest.raises(ValidationError, match=r"data\.template 'Solve: \{question' is not a format string"):
        DataConfig(template="Solve: {question")
    with pytest.raises(ValidationError, match=r"positional field"):
        DataConfig(template="Solve: {}")
    with pytest.raises(ValidationError, match=r"data\.path is required when data\.type = 'dataset'"):
        DataConfig(type="dataset")


def test_eval_fraction_is_seeded_disjoint_and_covers_the_file(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": str(i)} for i in range(40)]
    cfg = _dataset_cfg(_jsonl(tmp_path / "d.jsonl", rows), eval_fraction=0.25, eval_seed=7)
    train, ev = load_problems(cfg, "train"), load_problems(cfg, "eval")
    assert len(ev) == 10 and len(train) == 30  # ceil(0.25 * 40)
    rows_of = lambda ps: {int(p.prompt_id.partition("/")[2]) for p in ps}  # noqa: E731
    assert rows_of(train).isdisjoint(rows_of(ev)) and rows_of(train) | rows_of(ev) == set(range(40))
    assert all(p.question == f"q{p.prompt_id.partition('/')[2]}" for p in train + ev)  # ids name the file's row
    assert load_problems(cfg, "train") == train and load_problems(cfg, "eval") == ev  # deterministic
    other = load_problems(cfg.model_copy(update={"eval_seed": 8}), "eval")
    assert rows_of(other) != rows_of(ev)  # the seed draws the split
    assert len(load_problems(cfg.model_copy(update={"eval_size": 3}), "eval")) == 3
    assert load_problems(_dataset_cfg(tmp_path / "d.jsonl"), "eval") == []  # no held-out source: no eval


def test_text_prompt_template_and_system_prompt_render_with_the_chat_template(tmp_path, tokenizer):
    rows = [{"question": "7 * 6", "answer": "42", "unit": "apples"}]
    cfg = _dataset_cfg(_jsonl(tmp_path / "d.jsonl", rows), prompt_field="question",
                       template="Solve: {question} ({unit})", system_prompt="Be brief.", one_shot=False,
                       instruction="End with 'Answer: <n>'.")
    (p,) = load_problems(cfg, "train")
    assert p.question == "Solve: 7 * 6 (apples)" and p.columns == {"answer": "42", "unit": "apples"}
    env = make_environment(SingleTurn.worker_config(EnvConfig(), SimpleNamespace(max_tokens=8, reward_timeout_s=1.0),
                                                    cfg), p)
    text = tokenizer.apply_chat_template(env.reset(0), add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                    "<|im_start|>user\nSolve: 7 * 6 (apples)\nEnd with 'Answer: <n>'.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert encode_messages(tokenizer, env.reset(0)) == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_default_reasoning_gym_prompt_is_unchanged(tokenizer):
    """The default path (reasoning-gym arithmetic, one-shot demo, instruction) renders byte for byte as before."""
    cfg = DataConfig()
    p = load_problems(cfg.model_copy(update={"train_size": 1}), "train")[0]
    assert p == Problem("train/0", p.question, p.answer) and not p.messages and not p.columns
    env = make_environment(SingleTurn.worker_config(EnvConfig(), SimpleNamespace(max_tokens=8, reward_timeout_s=1.0),
                                                    cfg), p)
    ins = cfg.instruction
    assert env.reset(0) == [{"role": "user", "content": f"What is 23 + 18?\n{ins}"},
                            {"role": "assistant", "content": "23 + 18 = 41.\nAnswer: 41"},
                            {"role": "user", "content": f"{p.question}\n{ins}"}]
    assert env.reset(0) == build_messages(p.question, ins, True)
    assert tokenizer.apply_chat_template(env.reset(0), add_generation_prompt=True, tokenize=False) == (
        f"<|im_start|>user\nWhat is 23 + 18?\n{ins}<|im_end|>\n<|im_start|>assistant\n23 + 18 = 41.\nAnswer: 41"
        f"<|im_end|>\n<|im_start|>user\n{p.question}\n{ins}<|im_end|>\n<|im_start|>assistant\n")


def test_conversational_prompts_render_as_given(tmp_path, tokenizer):
    cfg = _dataset_cfg(_jsonl(tmp_path / "chat.jsonl", CHAT), answer_field="solution", system_prompt="Ignored.")
    problems = load_problems(cfg, "train")
    p = problems[1]
    assert p.messages == tuple(CHAT[1]["prompt"]) and p.question == "1 + 2?" and p.answer == "3"
    assert p.columns == {"solution": "3", "max_chars": 11}
    # the row's own messages: its system message kept, no instruction, no one-shot demo
    assert prompt_messages(p, cfg.instruction, cfg.one_shot, cfg.system_prompt) == CHAT[1]["prompt"]
    text = tokenizer.apply_chat_template(list(p.messages), add_generation_prompt=True, tokenize=False)
    assert text == "<|im_start|>system\nYou add.<|im_end|>\n<|im_start|>user\n1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    # without a system message of its own, data.system_prompt opens it
    bare = Problem("train/0", "hi", "", ({"role": "user", "content": "hi"},))
    assert prompt_messages(bare, "x", True, "Sys.") == [{"role": "system", "content": "Sys."},
                                                        {"role": "user", "content": "hi"}]
    # a conversational completion column as the reference: its last message's content
    rows = [{"prompt": "2 + 2?", "completion": [{"role": "assistant", "content": "4"}]}]
    assert load_problems(_dataset_cfg(_jsonl(tmp_path / "pc.jsonl", rows), answer_field="completion"),
                         "train")[0].answer == "4"
    rows = [{"prompt": "say hi"}]  # TRL's prompt-only data: no reference answer
    assert load_problems(_dataset_cfg(_jsonl(tmp_path / "po.jsonl", rows), answer_field=""), "train")[0].answer == ""


USER_REWARDS = '''
SEEN = []

def within(prompts, completions, max_chars, **kwargs):
    """Reads an extra column of the row, as TRL hands it."""
    SEEN.append(dict(prompts=prompts, max_chars=max_chars, **kwargs))
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # standard or conversational
    return [float(len(t) <= m) for t, m in zip(texts, max_chars)]

def needs_missing(prompts, completions, no_such_column, **kwargs):
    return [0.0]
'''


def test_extra_columns_reach_reward_functions_and_environments(tmp_path, monkeypatch):
    (tmp_path / "ds_user_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import ds_user_rewards

    cfg = _dataset_cfg(_jsonl(tmp_path / "chat.jsonl", CHAT), answer_field="solution")
    p = load_problems(cfg, "train")[2]  # max_chars 12
    # the driver checks signatures against the data's columns (RolloutGroup): one line naming a missing column
    assert reward_columns(cfg) == ("answer", "solution", "max_chars")
    rewards = [RewardConfig(fn="ds_user_rewards:within"), RewardConfig(fn="ds_user_rewards:within", name="chat",
                                                                       format="conversational")]
    RewardSet(rewards, 5.0, reward_columns(cfg))
    with pytest.raises(ValueError, match=r"needs_missing'.*no_such_column"):
        RewardSet([RewardConfig(fn="ds_user_rewards:needs_missing")], 5.0, reward_columns(cfg))
    # a rollout worker's scorer (columns unknown there: the driver checked them) hands each sample's row over
    worker = SimpleNamespace(rewards=RewardSet(rewards, 5.0, None))
    env = make_environment(EnvConfig(), p, RolloutWorker._scorer(worker, p))
    assert env.problem.columns == {"solution": "4", "max_chars": 12}  # what an environment reads
    step = env.step("It is 4.\nAnswer: 4")  # 19 characters > 12
    assert step.info["reward_terms"] == {"within": 0.0, "chat": 0.0} and step.info["correct"] is True
    assert env.step("Answer: 4").info["reward_terms"] == {"within": 1.0, "chat": 1.0}
    standard, chat = ds_user_rewards.SEEN[-2:]
    if standard["prompts"] != ["2 + 2?"]:
        standard, chat = chat, standard
    assert standard == {"prompts": ["2 + 2?"], "max_chars": [12], "solution": ["4"], "answer": ["4"]}
    assert chat["prompts"] == [list(CHAT[2]["prompt"])]  # conversational functions get the row's messages
    # a data column named "answer" wins over the reference, as TRL passes the row as it is
    s = RewardSet([RewardConfig(fn="ds_user_rewards:within")], 5.0, None).score(
        "q", "Answer: 1", "1", {"answer": "one", "max_chars": 3})
    assert s.terms == {"within": 0.0} and ds_user_rewards.SEEN[-1]["answer"] == ["one"]


def test_problems_survive_pickle_checkpoint_json_and_resume_checks(tmp_path):
    p = load_problems(_dataset_cfg(_jsonl(tmp_path / "chat.jsonl", CHAT), answer_field="solution"), "train")[0]
    assert pickle.loads(pickle.dumps(p)) == p and isinstance(hash(p), int)
    req = GenerateRequest((p,), ("g0",), (4,), 0, 1)
    assert GenerateRequest.from_dict(json.loads(json.dumps(req.to_dict()))) == req  # trainer.json in-flight requests
    assert Problem(**json.loads(json.dumps(asdict(p)))) == p  # the allocator's queue
    old = {"prompt_id": "train/3", "question": "q", "answer": "a"}  # a checkpoint written before columns existed
    assert Problem(**old) == Problem("train/3", "q", "a", (), {})
    # a checkpoint from before the new data fields resumes; changing the prompt's template does not
    saved = load_config(None, []).model_dump(mode="json")
    for k in ("split", "eval_fraction", "system_prompt", "template"):  # eval_seed is older: compared
        del saved["data"][k]
    assert incompatible_fields(saved, load_config(None, []).model_dump(mode="json")) == []
    changed = load_config(None, ["data.template=Q: {question}"]).model_dump(mode="json")
    assert incompatible_fields(load_config(None, []).model_dump(mode="json"), changed) == [
        "data.template: '' -> 'Q: {question}'"]
