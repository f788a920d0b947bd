"""The text in and out of a reward model: ``str.format`` templates filled with a sample's prompt, completion
and columns (`template_fields`, `render_template`), TRL's prompts and completions as text (`_text`), and the
parser of a judge's answer (`VerdictParser`).

Pure string helpers, shared by the configs (which validate templates and patterns at load), the scorers
and the client. Left out: any tokenization (the scorers do that with their model's tokenizer).
"""

from __future__ import annotations

import math
import re
import string
from typing import Any


def template_fields(template: str) -> tuple[str, ...]:
    """The names a ``str.format`` template fills (``{prompt}``, ``{completion}``, column names), in order.

    Raises:
        ValueError: a malformed template, or a field that is not a plain name (``{0}``, ``{a.b}``, ``{a[0]}``,
            ``{}``): only ``{name}`` is filled; write a literal brace as ``{{`` / ``}}``.
    """
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"template {template[:60]!r}... is malformed ({e}); write literal braces as {{{{ and }}}}"
                         ) from None
    names: list[str] = []
    for _, field, spec, conversion in parts:
        if field is None:
            continue
        if not field.isidentifier() or spec or conversion:
            raise ValueError(f"template field {{{field}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} is not a plain name; use {{prompt}}, {{completion}} or "
                             "a column name such as {answer} (literal braces: {{ and }})")
        if field not in names:
            names.append(field)
    return tuple(names)


def render_template(template: str, prompt: str, completion: str, columns: dict[str, Any] | None = None) -> str:
    """``template`` with ``{prompt}``, ``{completion}`` and each ``{column}`` filled (values as ``str``).

    Raises:
        ValueError: the template names a field that is neither prompt, completion nor one of ``columns``.
    """
    values = {**(columns or {}), "prompt": prompt, "completion": completion}
    missing = [f for f in template_fields(template) if f not in values]
    if missing:
        raise ValueError(f"template field(s) {missing} not given: the call has {sorted(values)}; pass the column "
                         "as a keyword (as reward functions get it) or remove it from the template")
    return template.format_map({k: str(v) for k, v in values.items()})


class VerdictParser:
    """Reads a judge's answer: the first (or last) match of ``pattern``, whose one capture group is the verdict.

    The verdict is looked up in ``verdicts`` (case-insensitive, stripped) when that mapping is given, else read
    as a number (``float``, thousands separators removed). An answer without a match, a verdict not in the
    mapping, or a non-finite number parses to None.

    Args:
        pattern: a regular expression with exactly one capture group.
        verdicts: captured text -> score, e.g. ``{"yes": 1.0, "no": 0.0}``; empty: the text is a number.
        match: ``"first"`` or ``"last"`` match in the answer.

    Raises:
        ValueError: the pattern does not compile or has other than one capture group; a bad ``match``.
    """

    def __init__(self, pattern: str, verdicts: dict[str, float] | None = None, match: str = "first") -> None:
        try:
            self.regex = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"judge pattern {pattern!r} is not a regular expression: {e}") from None
        if self.regex.groups != 1:
            raise ValueError(f"judge pattern {pattern!r} has {self.regex.groups} capture groups; it needs exactly one "
                             "(the verdict), e.g. '(yes|no)' or '(\\d+)'; make others non-capturing: (?:...)")
        if match not in ("first", "last"):
            raise ValueError(f"judge match = {match!r}; use 'first' or 'last'")
        self.verdicts = {k.strip().lower(): float(v) for k, v in (verdicts or {}).items()}
        self.match = match

    def __call__(self, text: str) -> float | None:
        """The score of one answer, or None when it has no verdict."""
        found = self.regex.findall(text)
        if not found:
            return None
        verdict = (found[0] if self.match == "first" else found[-1]).strip()
        if self.verdicts:
            return self.verdicts.get(verdict.lower())
        try:
            value = float(verdict.replace(",", ""))
        except ValueError:
            return None
        return value if math.isfinite(value) else None


def _text(x: Any) -> str:
    """A prompt or completion as text: a string as it is, TRL's conversational message list as its contents."""
    if isinstance(x, str):
        return x
    if isinstance(x, (list, tuple)) and all(isinstance(m, dict) and "content" in m for m in x):
        return "\n".join(str(m["content"]) for m in x)
    return str(x)
