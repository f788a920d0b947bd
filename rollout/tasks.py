"""Prompt sources: problems with reference answers, and the chat prompt built from them.

Two sources behind one function, selected by ``DataConfig.type``: reasoning-gym procedural tasks
(offline, seeded, unlimited variants) and local jsonl/parquet files read with `datasets`.

Left out on purpose: streaming datasets, multi-turn prompts, tool use.
"""

from __future__ import annotations

import os
from typing import Any

from buffer.records import Problem

ONE_SHOT_QUESTION = "What is 23 + 18?"
ONE_SHOT_ANSWER = "23 + 18 = 41.\nAnswer: 41"


def _reasoning_gym(task: str, size: int, seed: int, task_config: dict[str, Any], split: str) -> list[Problem]:
    import reasoning_gym

    kwargs = dict(task_config)
    if "operators" in kwargs and isinstance(kwargs["operators"], list):
        kwargs["operators"] = tuple(kwargs["operators"])
    try:
        ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise ValueError(f"data.task {task!r} with task_config {task_config!r}: {e}") from None
    return [Problem(f"{split}/{i}", str(x["question"]), str(x["answer"])) for i, x in enumerate(ds)]


def _local_file(path: str, prompt_field: str, answer_field: str, split: str, limit: int) -> list[Problem]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    if os.path.getsize(path) == 0:
        raise ValueError(f"the {split} dataset ({path}) is empty")
    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
        ds = load_dataset(kind, data_files=path, split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise ValueError(f"data file {path!r} could not be read as {kind}: {type(e).__name__}: {e}") from None
    for field in (prompt_field, answer_field):
        if field not in ds.column_names:
            raise ValueError(f"data file {path!r} has no field {field!r} (fields: {ds.column_names})")
    n = min(limit, len(ds))
    return [Problem(f"{split}/{i}", str(ds[i][prompt_field]), str(ds[i][answer_field])) for i in range(n)]


def load_problems(cfg, split: str) -> list[Problem]:
    """Load the ``train`` or ``eval`` problems described by a `DataConfig`.

    Raises:
        ValueError: unknown split/task, bad task_config, missing field, or an empty dataset.
        FileNotFoundError: a data file that does not exist.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    size = cfg.train_size if split == "train" else cfg.eval_size
    if split == "eval" and size == 0:
        return []
    if cfg.type == "reasoning_gym":
        seed = cfg.train_seed if split == "train" else cfg.eval_seed
        problems = _reasoning_gym(cfg.task, size, seed, cfg.task_config, split)
    else:
        path = cfg.path if split == "train" else cfg.eval_path
        if path is None:  # no held-out file: no eval
            return []
        problems = _local_file(path, cfg.prompt_field, cfg.answer_field, split, size)
    if not problems:
        where = cfg.path if cfg.type == "jsonl" else f"reasoning-gym task {cfg.task!r}"
        raise ValueError(f"the {split} dataset ({where}) is empty")
    return problems


def build_messages(question: str, instruction: str, one_shot: bool) -> list[dict[str, str]]:
    """Chat messages for one problem: optional one-shot demo of the answer format, then the question."""
    msgs = []
    if one_shot:
        msgs += [
            {"role": "user", "content": f"{ONE_SHOT_QUESTION}\n{instruction}"},
            {"role": "assistant", "content": ONE_SHOT_ANSWER},
        ]
    msgs.append({"role": "user", "content": f"{question}\n{instruction}"})
    return msgs


def encode_prompt(tokenizer, question: str, instruction: str, one_shot: bool) -> list[int]:
    """Token ids of the chat-templated prompt (generation prompt appended)."""
    text = tokenizer.apply_chat_template(
        build_messages(question, instruction, one_shot), add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def greedy_accuracy(engine, problems: list[Problem], instruction: str, one_shot: bool, max_tokens: int) -> float:
    """Held-out accuracy of ``engine`` (a `rollout.engine.VLLMEngine`) on ``problems``: greedy answers of
    at most ``max_tokens`` tokens, strict exact match (`rollout.rewards.score_response`); NaN for none."""
    from rollout.rewards import score_response

    if not problems:
        return float("nan")
    prompts = [encode_prompt(engine.tokenizer, p.question, instruction, one_shot) for p in problems]
    outs = engine.generate(prompts, 1, max_tokens, temperature=0.0)
    return sum(score_response(o[0].text, p.answer)[1] for p, o in zip(problems, outs)) / len(problems)
