import json

import pytest

from rollout.config import DataConfig
from rollout.tasks import build_messages, load_problems


def test_reasoning_gym_train_and_eval_differ():
    cfg = DataConfig(task="basic_arithmetic", task_config={"min_terms": 2, "max_terms": 2, "max_digits": 2},
                     train_size=20, eval_size=20)
    train, ev = load_problems(cfg, "train"), load_problems(cfg, "eval")
    assert len(train) == len(ev) == 20
    assert train[0].prompt_id == "train/0" and ev[0].prompt_id == "eval/0"
    assert [p.question for p in train] != [p.question for p in ev]
    assert load_problems(cfg, "train") == train  # seeded


def test_jsonl_source_and_errors(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"{i}+1", "a": str(i + 1)}) for i in range(5)))
    cfg = DataConfig(type="jsonl", path=str(path), prompt_field="q", answer_field="a")
    probs = load_problems(cfg, "train")
    assert [p.answer for p in probs] == ["1", "2", "3", "4", "5"]
    assert load_problems(cfg, "eval") == []
    with pytest.raises(ValueError, match="no column 'prompt'.*data.prompt_field"):
        load_problems(DataConfig(type="jsonl", path=str(path)), "train")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_problems(DataConfig(type="jsonl", path=str(tmp_path / "missing.jsonl")), "train")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_problems(DataConfig(type="jsonl", path=str(empty)), "train")


def test_bad_task_names_the_task():
    with pytest.raises(ValueError, match="no_such_task"):
        load_problems(DataConfig(task="no_such_task"), "train")


def test_one_shot_messages():
    msgs = build_messages("What is 1+1?", "Reply.", one_shot=True)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
    assert "Answer:" in msgs[1]["content"] and msgs[2]["content"].startswith("What is 1+1?")
