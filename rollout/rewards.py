"""Verifiable rewards for math answers.

The response must end its work with a line ``Answer: <value>`` (strict parse). The reward is 1.0
when the parsed value equals the reference (numerically when both parse as numbers, else as
normalised strings, else by math-verify), 0.0 otherwise. Held-out accuracy uses the same strict
exact match, never partial credit.

Left out on purpose: partial-credit shaping, format rewards, LLM judges.
"""

from __future__ import annotations

import re

_ANSWER_RE = re.compile(r"answer\s*[:：]\s*(.+)", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The value after the last ``Answer:`` in ``text`` (stripped, trailing '.' removed), or None."""
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    value = matches[-1].strip().strip("$ ").rstrip(".").strip()
    return value or None


def _as_number(s: str) -> float | None:
    try:
        return float(s.replace(",", "").replace(" ", ""))
    except ValueError:
        return None


def answers_match(predicted: str, reference: str) -> bool:
    """Exact match: numeric equality (|a-b| <= 1e-6 * max(1, |b|)), then normalised string, then math-verify."""
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    if predicted.strip().lower() == reference.strip().lower():
        return True
    try:
        from math_verify import parse, verify

        # Off the main thread math-verify cannot use signal.alarm: disable its timeouts.
        gold = parse(reference, parsing_timeout=None)
        pred = parse(predicted, parsing_timeout=None)
        return bool(verify(gold, pred, timeout_seconds=None))
    except Exception:  # noqa: BLE001 - an unparsable answer is simply wrong
        return False


def score_response(text: str, reference: str) -> tuple[float, bool]:
    """Return ``(reward, correct)`` for one response; reward is 1.0 iff the strict parse matches."""
    pred = extract_answer(text)
    correct = pred is not None and answers_match(pred, reference)
    return (1.0 if correct else 0.0), correct


_POOL = None


def score_safely(fn, text: str, reference: str, timeout_s: float) -> tuple[float, bool, str]:
    """Run reward function ``fn(text, reference) -> (reward, correct)`` with a time budget.

    Returns ``(reward, correct, error)``; ``error`` is ``""`` on success, else the reason
    (``"raised ValueError: ..."`` or ``"timed out after 2.0 s"``) with reward 0.0 and correct False.
    A reward function that never returns keeps one pool thread busy; the caller moves on. A
    non-finite reward counts as an error too.
    """
    import concurrent.futures as cf
    import math

    global _POOL
    if _POOL is None:
        _POOL = cf.ThreadPoolExecutor(max_workers=4, thread_name_prefix="reward")
    fut = _POOL.submit(fn, text, reference)
    try:
        reward, correct = fut.result(timeout=timeout_s)
    except cf.TimeoutError:
        return 0.0, False, f"timed out after {timeout_s:g} s"
    except Exception as e:  # any failure of user reward code is recorded, not raised
        return 0.0, False, f"raised {type(e).__name__}: {e}"[:300]
    if not math.isfinite(float(reward)):
        return 0.0, False, f"returned a non-finite reward {reward!r}"
    return float(reward), bool(correct), ""
