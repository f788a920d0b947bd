"""Prompt sources: problems with reference answers, and the chat prompt built from them.

Two sources behind one function (`load_problems`), selected by ``DataConfig.type``:

- ``reasoning_gym``: procedural tasks (offline, seeded, unlimited variants).
- ``dataset`` (old name ``jsonl``): data the way users hold it, read with `datasets`: a dir written by
  ``save_to_disk``, a ``.jsonl`` / ``.json`` / ``.parquet`` / ``.csv`` file, or a hub dataset name (needs the
  network or the hub cache). Rows in TRL's dataset formats: *standard* (the prompt column holds text) or
  *conversational* (it holds a list of ``{"role", "content"}`` messages). Every other column of a row rides on
  the `Problem` (``columns``) to the reward functions (as TRL's ``**kwargs``) and the environments. The
  held-out split is its own source (``eval_path``) or a seeded fraction of the training rows (``eval_fraction``).

A text prompt becomes chat messages with relayrl's builder (`build_messages`: optional system prompt, optional
one-shot demo of the answer format, the text with the instruction on its own line); a conversational prompt
is rendered as given (a system prompt is put first when it has none). The chat template of the model's
tokenizer turns either into tokens.

Left out on purpose: streaming datasets (rows are read at start, on the driver), multi-split mixing, prompt
filtering by length.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any

from buffer.records import Problem

ONE_SHOT_QUESTION = "What is 23 + 18?"
ONE_SHOT_ANSWER = "23 + 18 = 41.\nAnswer: 41"

# file suffix -> the `datasets` builder that reads it
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# keywords a reward function gets from relayrl itself: a column of these names could not reach it
RESERVED_COLUMNS = ("prompts", "completions")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _reasoning_gym(task: str, size: int, seed: int, task_config: dict[str, Any], split: str) -> list[tuple]:
    import reasoning_gym

    kwargs = dict(task_config)
    if "operators" in kwargs and isinstance(kwargs["operators"], list):
        kwargs["operators"] = tuple(kwargs["operators"])
    try:
        ds = reasoning_gym.create_dataset(task, size=size, seed=seed, **kwargs)
    except (KeyError, ValueError, TypeError, AssertionError) as e:
        raise ValueError(f"data.task {task!r} with task_config {task_config!r}: {e}") from None
    return [(f"{split}/{i}", {"question": str(x["question"]), "answer": str(x["answer"])}) for i, x in enumerate(ds)]


def _stamp(path: str) -> tuple[int, int] | None:
    """(mtime, size) of a local path, so a rewritten file is read again; None for a hub name."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def read_dataset(path: str, split: str, field: str = "data.path"):
    """The rows at ``path`` as a `datasets.Dataset` (memory-mapped Arrow; repeated reads are cached).

    Args:
        path: a dir written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, a ``.jsonl``, ``.json``,
            ``.parquet`` or ``.csv`` file, or a hub dataset name ``owner/name``.
        split: the split taken from a source that holds several (a saved `DatasetDict`, a hub dataset).
        field: the config field named in errors.

    Raises:
        FileNotFoundError: a local path (absolute, relative with a dir part or a data suffix) that does not exist.
        ValueError: one line naming ``path``: an unknown file format, an empty file, a missing split, a file
            `datasets` cannot read, or a hub dataset that cannot be loaded (offline and not cached).
    """
    path = os.path.expanduser(path)
    return _read_cached(path, split, field, _stamp(path))


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, split: str, field: str, stamp: tuple[int, int] | None):
    from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

    if os.path.isdir(path):
        if not any(os.path.exists(os.path.join(path, f)) for f in ("state.json", "dataset_dict.json")):
            raise ValueError(f"{field} = {path!r} is a dir that datasets' save_to_disk did not write (no state.json "
                             "or dataset_dict.json): point it at such a dir or at a .jsonl/.json/.parquet/.csv file")
        try:
            ds = load_from_disk(path)
        except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable dirs
            raise ValueError(f"{field} = {path!r} could not be read by datasets.load_from_disk: "
                             f"{_first_line(e)}") from None
    elif os.path.isfile(path):
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in FILE_FORMATS:
            raise ValueError(f"{field} = {path!r}: unknown format {suffix or '(no suffix)'!r}; use a "
                             f"{', '.join(FILE_FORMATS)} file or a dir written by datasets' save_to_disk")
        if os.path.getsize(path) == 0:
            raise ValueError(f"{field} = {path!r} is an empty file: put rows in it")
        kind = FILE_FORMATS[suffix]
        try:
            ds = load_dataset(kind, data_files=path, split="train")
        except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
            if "corresponds to no data" in str(e):  # a csv header alone, a json file of whitespace
                raise ValueError(f"{field} = {path!r} has no rows: put rows in it") from None
            raise ValueError(f"{field} = {path!r} could not be read as {kind}: {_first_line(e)}") from None
    elif (os.path.isabs(path) or path.startswith(("./", "../")) or path.count("/") > 1
          or os.path.splitext(path)[1].lower() in FILE_FORMATS):
        raise FileNotFoundError(f"{field} = {path!r} does not exist (a local file or dir; a hub dataset is "
                                "'owner/name')")
    else:
        try:
            ds = load_dataset(path, split=split)
        except Exception as e:  # noqa: BLE001 - network, auth and missing-dataset errors all end here
            raise ValueError(f"{field} = {path!r} is no local file or dir, and the hub dataset could not be loaded "
                             f"(offline or not cached?): {_first_line(e)}; where there is network, save it with "
                             f"datasets.load_dataset({path!r}, split={split!r}).save_to_disk(DIR) and set {field} = DIR"
                             ) from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ValueError(f"{field} = {path!r} has splits {sorted(ds)}, not {split!r}: set "
                             f"{'data.eval_split' if 'eval' in field else 'data.split'} to one of them")
        ds = ds[split]
    assert isinstance(ds, Dataset), type(ds)
    return ds


def _json_feature(feature) -> str | None:
    """None when a column of this `datasets` feature holds JSON values (text, numbers, booleans, lists and dicts
    of them); else the offending type's name."""
    from datasets import ClassLabel, Value

    if isinstance(feature, dict):
        return next(filter(None, (_json_feature(f) for f in feature.values())), None)
    if isinstance(feature, (list, tuple)):
        return next(filter(None, (_json_feature(f) for f in feature)), None)
    if isinstance(feature, ClassLabel):
        return None
    if isinstance(feature, Value):
        d = feature.dtype
        ok = d in ("null", "bool", "string", "large_string") or d.startswith(("int", "uint", "float"))
        return None if ok else f"Value({d!r})"
    if hasattr(feature, "feature"):  # List / LargeList / Sequence
        return _json_feature(feature.feature)
    return type(feature).__name__


def _check_columns(ds, cfg, where: str) -> None:
    columns = ds.column_names
    if not cfg.template and cfg.prompt_field not in columns:
        raise ValueError(f"{where} has no column {cfg.prompt_field!r} (columns: {', '.join(columns)}): set "
                         "data.prompt_field to the prompt's column, or data.template to build it from columns")
    if cfg.answer_field and cfg.answer_field not in columns:
        raise ValueError(f"{where} has no column {cfg.answer_field!r} (columns: {', '.join(columns)}): set "
                         "data.answer_field to the reference answer's column ('' for data without one)")
    for name in columns:
        if name in RESERVED_COLUMNS:
            raise ValueError(f"{where} has a column {name!r}, a keyword relayrl gives reward functions itself: "
                             "rename it (Dataset.rename_column)")
        bad = _json_feature(ds.features[name]) if name != cfg.prompt_field else None
        if bad:
            raise ValueError(f"{where}: column {name!r} holds {bad}, not JSON values (problems travel between "
                             "actors and into checkpoints as JSON): cast it to string or drop it "
                             "(Dataset.cast_column / remove_columns)")


def _messages(value: list, where: str) -> tuple[dict[str, str], ...]:
    """A conversational prompt's messages, checked; keys a struct column filled with None are dropped."""
    msgs = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: a conversational prompt's messages need 'role' and 'content' text, got {m!r}")
        msgs.append({k: v for k, v in m.items() if v is not None})
    if not msgs:
        raise ValueError(f"{where}: the prompt is an empty message list")
    return tuple(msgs)


def _answer(value: Any) -> str:
    """A reference answer as text: a conversational completion's last message's content, '' for none."""
    if value is None:
        return ""
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return str(value[-1]["content"])
    return str(value)


def _render(template: str, row: dict[str, Any], where: str) -> str:
    """``data.template`` filled with the row's columns."""
    try:
        return template.format(**row)
    except KeyError as e:
        raise ValueError(f"data.template {template!r} names column {e.args[0]!r}, which {where} lacks (columns: "
                         f"{', '.join(row)})") from None
    except (IndexError, AttributeError, TypeError, ValueError) as e:
        raise ValueError(f"data.template {template!r} cannot be filled from {where}: {_first_line(e)}") from None


def _problem(pid: str, row: dict[str, Any], cfg, where: str) -> Problem:
    """One data row as a `Problem`: the prompt (text, from ``data.template`` when set, or messages), the answer
    and every column but the prompt's."""
    where = f"{where} row {pid.partition('/')[2]}"
    answer = _answer(row.get(cfg.answer_field)) if cfg.answer_field else ""
    prompt = row.get(cfg.prompt_field)
    messages: tuple[dict[str, str], ...] = ()
    if cfg.template:
        if isinstance(prompt, list):
            raise ValueError(f"{where}: data.template applies to text prompts; column {cfg.prompt_field!r} is "
                             "conversational (a message list): unset data.template")
        question = _render(cfg.template, row, where)
    elif isinstance(prompt, list):
        messages = _messages(prompt, where)
        users = [m["content"] for m in messages if m["role"] == "user"]
        question = users[-1] if users else messages[-1]["content"]
    elif isinstance(prompt, str) and prompt:
        question = prompt
    else:
        raise ValueError(f"{where}: column {cfg.prompt_field!r} holds {prompt!r}, not a prompt (text, or a list of "
                         "{role, content} messages)")
    return Problem(pid, question, answer, messages, {k: v for k, v in row.items() if k != cfg.prompt_field})


def _held_out_rows(n: int, fraction: float, seed: int, where: str) -> tuple[list[int], list[int]]:
    """``(train rows, held-out rows)``, each sorted: ceil(fraction * n) rows drawn without replacement by a
    seeded permutation (numpy's PCG64), the rest for training."""
    import numpy as np

    k = math.ceil(fraction * n)
    if k >= n:
        raise ValueError(f"data.eval_fraction = {fraction:g} of {where}'s {n} rows leaves none for training: lower it")
    held = np.random.default_rng(seed).permutation(n)[:k]
    mask = np.zeros(n, dtype=bool)
    mask[held] = True
    return np.flatnonzero(~mask).tolist(), np.flatnonzero(mask).tolist()


def _dataset_problems(cfg, split: str, size: int) -> list[Problem]:
    if split == "eval" and not cfg.eval_fraction:
        path, source_split, field = cfg.eval_path, cfg.eval_split, "data.eval_path"
    else:
        path, source_split, field = cfg.path, cfg.split, "data.path"
    ds = read_dataset(path, source_split, field)
    where = f"{field} {path!r}"
    if len(ds) == 0:
        raise ValueError(f"{where} has no rows: put rows in it")
    _check_columns(ds, cfg, where)
    rows = list(range(len(ds)))
    if cfg.eval_fraction:
        train_rows, eval_rows = _held_out_rows(len(ds), cfg.eval_fraction, cfg.eval_seed, where)
        rows = train_rows if split == "train" else eval_rows
    rows = rows[:size]
    return [_problem(f"{split}/{r}", row, cfg, where) for r, row in zip(rows, ds.select(rows).to_list())]


def load_problems(cfg, split: str) -> list[Problem]:
    """Load the ``train`` or ``eval`` problems described by a `DataConfig`.

    Prompt ids are ``split/<row>``: the reasoning-gym item's index, or the row's index in its source (with
    ``eval_fraction``, ``train/<row>`` and ``eval/<row>`` number disjoint rows of the same ``data.path``).

    Raises:
        ValueError: one line naming the bad value and the fix: unknown split/task, bad task_config, unknown file
            format, empty data, missing column, a column that is not JSON, a prompt that is neither text nor
            messages, a template naming a missing column, an unloadable hub dataset.
        FileNotFoundError: a local data path that does not exist.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    size = cfg.train_size if split == "train" else cfg.eval_size
    if split == "eval" and size == 0:
        return []
    if cfg.type == "reasoning_gym":
        seed = cfg.train_seed if split == "train" else cfg.eval_seed
        items = _reasoning_gym(cfg.task, size, seed, cfg.task_config, split)
        if not items:
            raise ValueError(f"the {split} dataset (reasoning-gym task {cfg.task!r}) is empty")
        where = f"reasoning-gym task {cfg.task!r}"
        return [Problem(pid, _render(cfg.template, row, f"{where} item {pid}") if cfg.template else row["question"],
                        row["answer"]) for pid, row in items]
    if split == "eval" and not cfg.eval_path and not cfg.eval_fraction:  # no held-out source: no eval
        return []
    return _dataset_problems(cfg, split, size)


def data_columns(cfg) -> tuple[str, ...]:
    """The column keywords reward functions get besides ``prompts`` and ``completions``: ``answer`` (the reference)
    and, for a dataset, every column of its rows but the prompt's, read from ``data.path`` here; where that
    cannot be read (another node), ``answer`` and ``data.answer_field``."""
    if cfg.type == "reasoning_gym":
        return ("answer",)
    known = ("answer", *((cfg.answer_field,) if cfg.answer_field not in ("", "answer") else ()))
    try:
        names = read_dataset(cfg.path, cfg.split).column_names
    except (OSError, ValueError):
        return known
    return tuple(dict.fromkeys([*known, *(c for c in names if c != cfg.prompt_field)]))


def build_messages(question: str, instruction: str, one_shot: bool, system_prompt: str = "") -> list[dict[str, str]]:
    """Chat messages for a text prompt: the system prompt (when given), an optional one-shot demo of the answer
    format, then the question with the instruction on its own line (when given)."""
    def ask(text: str) -> str:
        return f"{text}\n{instruction}" if instruction else text

    msgs = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if one_shot:
        msgs += [
            {"role": "user", "content": ask(ONE_SHOT_QUESTION)},
            {"role": "assistant", "content": ONE_SHOT_ANSWER},
        ]
    msgs.append({"role": "user", "content": ask(question)})
    return msgs


def prompt_messages(problem: Problem, instruction: str, one_shot: bool,
                    system_prompt: str = "") -> list[dict[str, str]]:
    """The chat messages of ``problem``'s prompt: a conversational prompt's own messages (with ``system_prompt``
    first when they hold no system message; no instruction, no one-shot demo), else `build_messages`."""
    if not problem.messages:
        return build_messages(problem.question, instruction, one_shot, system_prompt)
    msgs = [dict(m) for m in problem.messages]
    if system_prompt and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def encode_messages(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of ``messages`` rendered with the tokenizer's chat template, generation prompt appended."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, question: str, instruction: str, one_shot: bool) -> list[int]:
    """Token ids of the chat-templated prompt of a text question (generation prompt appended)."""
    return encode_messages(tokenizer, build_messages(question, instruction, one_shot))


def greedy_accuracy(engine, problems: list[Problem], instruction: str, one_shot: bool, max_tokens: int,
                    system_prompt: str = "") -> float:
    """Held-out accuracy of ``engine`` (a `rollout.engine.VLLMEngine`) on ``problems``: greedy answers of
    at most ``max_tokens`` tokens, strict exact match (`rollout.rewards.score_response`); NaN for none."""
    from rollout.rewards import score_response

    if not problems:
        return float("nan")
    prompts = [encode_messages(engine.tokenizer, prompt_messages(p, instruction, one_shot, system_prompt))
               for p in problems]
    outs = engine.generate(prompts, 1, max_tokens, temperature=0.0)
    return sum(score_response(o[0].text, p.answer)[1] for p, o in zip(problems, outs)) / len(problems)

