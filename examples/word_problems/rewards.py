"""The example's reward functions, in TRL's ``reward_funcs`` signature: ``fn(prompts, completions, **columns) ->
list[float | None]``, one value per completion, every data column a keyword holding one value per completion.

They import nothing from relayrl: the same functions work as ``GRPOTrainer(reward_funcs=[correct,
answer_format])`` in TRL. The run config names them by import path (``examples.word_problems.rewards:correct``).

Left out on purpose: partial credit for near misses (a wrong number scores 0, as held-out accuracy counts it).
"""

from __future__ import annotations

import re
from typing import Any

_ANSWER = re.compile(r"answer\s*:\s*(.+)", re.IGNORECASE)
_FINAL_LINE = re.compile(r"answer:\s*-?\d+\.?", re.IGNORECASE)


def parse_answer(completion: str, unit: str = "") -> int | None:
    """The integer on the completion's last ``Answer:`` line, or None when there is none or it is not a number.

    The value may be followed by the problem's ``unit`` (``Answer: 12 apples``) and a full stop; thousands
    separators are dropped (``1,200``); ``12.0`` reads as 12.
    """
    found = _ANSWER.findall(completion)
    if not found:
        return None
    value = found[-1].strip().rstrip(".").strip()
    if unit and value.lower().endswith(unit.lower()):
        value = value[: -len(unit)].strip()
    try:
        number = float(value.replace(",", ""))
    except ValueError:
        return None
    return int(number) if number.is_integer() else None


def correct(prompts: list[str], completions: list[str], answer: list[str], unit: list[str],
            **kwargs: Any) -> list[float]:
    """1.0 where the last ``Answer:`` line holds the reference number (`parse_answer`, which also accepts the
    row's ``unit`` after it), else 0.0.

    Args:
        prompts: the problems' text (unused).
        completions: the model's responses, plain text.
        answer: the reference answers (the dataset's ``answer`` column), integers as text.
        unit: the dataset's ``unit`` column, e.g. ``"apples"``.
    """
    out = []
    for text, ref, u in zip(completions, answer, unit):
        got = parse_answer(text, u)
        out.append(float(got is not None and got == int(ref)))
    return out


def answer_format(completions: list[str], **kwargs: Any) -> list[float]:
    """1.0 where the response's last non-empty line is exactly ``Answer: <integer>`` (what held-out accuracy's
    strict parse reads best), else 0.0. Right or wrong: it rewards the format alone."""
    out = []
    for text in completions:
        lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
        out.append(float(bool(lines) and _FINAL_LINE.fullmatch(lines[-1]) is not None))
    return out
