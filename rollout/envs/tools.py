"""Tool calls: the documented call format, its parser, and the tools (run in `rollout.envs.sandbox`).

Format (the Hermes / Qwen convention; SmolLM2-135M-Instruct's chat template has no tool syntax of its
own): the assistant writes one or more

    <tool_call>{"name": "python", "arguments": {"code": "print(17 * 23)"}}</tool_call>

and each call's result comes back as the next user turn, ``<tool_response>...</tool_response>``.
Tools: ``python`` (``code``: a program; its printed output is the result) and ``calculator``
(``expression``: one arithmetic expression over numbers and the ``math`` module's names).

A call that is not valid JSON, names an unknown tool or lacks its argument is not an exception: it
becomes a failed `ToolResult` whose observation says what was wrong (the model sees it, the episode
counts it).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rollout.envs.sandbox import ToolResult, run_python

if TYPE_CHECKING:
    from rollout.envs.config import SandboxConfig

TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
TOOL_PROMPT = (
    "You can use tools. To call one, write <tool_call>{{\"name\": NAME, \"arguments\": {{...}}}}</tool_call> and "
    "stop; its result comes back as <tool_response>...</tool_response>. Tools: {tools}. When you know the answer, "
    "reply without a tool call."
)
TOOL_DOCS = {"python": 'python {"code": program} (runs it; shows what it prints)',
             "calculator": 'calculator {"expression": arithmetic} (e.g. "17 * 23")'}


@dataclass(frozen=True)
class ToolCall:
    """A parsed call: tool ``name`` and its ``arguments``; ``error`` is non-empty for a malformed call."""

    name: str
    arguments: dict[str, Any]
    error: str = ""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>{json}</tool_call>`` in ``text``, in order; malformed ones carry an ``error``."""
    calls = []
    for body in TOOL_CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(ToolCall("", {}, f"tool call is not valid JSON ({e.msg} at char {e.pos}): {body[:200]!r}"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(
                obj.get("arguments", {}), dict):
            calls.append(ToolCall("", {}, 'tool call must be {"name": str, "arguments": {...}}, got '
                                  f"{body[:200]!r}"))
            continue
        calls.append(ToolCall(obj["name"], obj.get("arguments", {})))
    return calls


def _calculator_program(expression: str) -> str:
    return ("import math\n"
            "names = {k: getattr(math, k) for k in dir(math) if not k.startswith('_')}\n"
            f"print(eval(compile({expression!r}, '<expression>', 'eval'), {{'__builtins__': {{}}}}, names))\n")


TOOLS = {"python": ("code", lambda code: code), "calculator": ("expression", _calculator_program)}


def run_tool_call(call: ToolCall, cfg: SandboxConfig, allowed: tuple[str, ...] = tuple(TOOLS)) -> ToolResult:
    """Run ``call`` in the sandbox; a malformed or unknown call is a failed result, never an exception."""
    if call.error:
        return ToolResult(False, call.error, "error", 0.0)
    if call.name not in allowed:
        return ToolResult(False, f"unknown tool {call.name!r}; available: {', '.join(allowed)}", "error", 0.0)
    arg, program = TOOLS[call.name]
    value = call.arguments.get(arg)
    if not isinstance(value, str):
        return ToolResult(False, f"tool {call.name!r} needs a string argument {arg!r}, got {value!r}"[:300],
                          "error", 0.0)
    return run_python(program(value), cfg)


def tool_response(result: ToolResult) -> str:
    """The observation text of one result, wrapped in the documented tags."""
    return f"<tool_response>\n{result.observation()}\n</tool_response>"


def tool_prompt(tools: tuple[str, ...]) -> str:
    """System text that documents the call format and the given tools."""
    return TOOL_PROMPT.format(tools="; ".join(TOOL_DOCS[t] for t in tools))
