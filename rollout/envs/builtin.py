"""The environments relayrl ships: ``single_turn`` (one answer to the problem) and ``tool_math`` (the problem
solved with calculator/python tool calls, answer checked at the end).

Left out on purpose: shaped rewards for tool use (only the final answer is rewarded).
"""

from __future__ import annotations

from typing import Any

from rollout.envs.base import Environment, Message, StepResult, check_options, register_environment
from rollout.envs.tools import TOOLS, parse_tool_calls, run_tool_call, tool_prompt, tool_response

ANSWER_FORMAT = "Give the final line as 'Answer: <number>'."


def answer_step(env: Environment, action: str) -> StepResult:
    """The last step of an answer-checked episode: ``action`` scored by ``env.score`` against the problem's
    answer; a failed reward function is reported as ``info["reward_error"]``, and the run's reward functions'
    parts (a `rollout.rewards.Score`) as ``info["reward_terms"]`` and ``info["reward_failed"]``."""
    score = env.score(action, env.problem.answer)
    reward, correct, error = score
    info: dict[str, Any] = {"correct": correct, **({"reward_error": error} if error else {})}
    if getattr(score, "terms", None) or getattr(score, "failed", None):
        info.update(reward_terms=dict(score.terms), reward_failed=list(score.failed))
    return StepResult([], reward, True, info)


@register_environment("single_turn")
class SingleTurn(Environment):
    """The problem as one user message; the first answer ends the episode, reward = ``score`` (the run's
    reward function). Every single-turn task of the ``data`` section is this one-step episode.

    Options: ``instruction`` (str, appended to the question), ``one_shot`` (bool, prepend a worked example),
    ``system_prompt`` (str, a system message first; "" for none); the rollout worker fills them from the ``data``
    section unless set here. A conversational problem (``problem.messages``) opens with its own messages
    (`rollout.tasks.prompt_messages`).
    """

    def __init__(self, problem, options: dict[str, Any], cfg) -> None:
        from rollout.config import DataConfig

        super().__init__(problem, options, cfg)
        d = DataConfig()
        self.opts = check_options("single_turn", options, {"instruction": d.instruction, "one_shot": d.one_shot,
                                                           "system_prompt": d.system_prompt})

    @classmethod
    def worker_config(cls, cfg, rollout, data):
        """The data section's prompt format (unless set in options); one answer of up to ``rollout.max_tokens``,
        scored by reward calls that may wait ``rollout.reward_timeout_s`` for a thread and run as long (a slow
        reward is a reward failure, not an environment one)."""
        return cfg.model_copy(update={
            "options": {"instruction": data.instruction, "one_shot": data.one_shot,
                        "system_prompt": data.system_prompt, **cfg.options},
            "max_episode_tokens": max(cfg.max_episode_tokens, rollout.max_tokens),
            "step_timeout_s": max(cfg.step_timeout_s, 2 * rollout.reward_timeout_s + 5.0)})

    def reset(self, seed: int) -> list[Message]:
        from rollout.tasks import prompt_messages

        o = self.opts
        return prompt_messages(self.problem, o["instruction"], o["one_shot"], o["system_prompt"])

    def step(self, action: str) -> StepResult:
        return answer_step(self, action)


@register_environment("tool_math")
class ToolMath(Environment):
    """Arithmetic with tools: a system message documents the tool-call format (`rollout.envs.tools`); each
    turn with tool calls gets their results back as the next user message (reward 0); the first turn
    without a call is the answer (reward = `score_response`, 1.0 for an exact match) and ends the episode.

    Options: ``tools`` (list of ``calculator`` / ``python``; default both), ``max_calls_per_turn`` (int,
    default 2; further calls in one turn are refused in the observation), ``instruction`` (str).

    Raises:
        ValueError: an unknown tool name or a non-positive ``max_calls_per_turn``.
    """

    def __init__(self, problem, options: dict[str, Any], cfg) -> None:
        super().__init__(problem, options, cfg)
        self.opts = check_options("tool_math", options, {"tools": list(TOOLS), "max_calls_per_turn": 2,
                                                         "instruction": ANSWER_FORMAT})
        bad = [t for t in self.opts["tools"] if t not in TOOLS]
        if bad or not self.opts["tools"]:
            raise ValueError(f"rollout.env.options.tools = {self.opts['tools']!r}: choose from {list(TOOLS)}")
        if int(self.opts["max_calls_per_turn"]) < 1:
            raise ValueError(f"rollout.env.options.max_calls_per_turn = {self.opts['max_calls_per_turn']!r}: "
                             "must be >= 1")
        self.tools = tuple(self.opts["tools"])

    @classmethod
    def check_worker(cls, cfg) -> str:
        """That the sandbox runs tools on this node (`rollout.envs.sandbox.check_sandbox`)."""
        from rollout.envs.sandbox import check_sandbox

        return f"tool sandbox isolation: {check_sandbox(cfg.sandbox)}"

    def reset(self, seed: int) -> list[Message]:
        return [{"role": "system", "content": tool_prompt(self.tools)},
                {"role": "user", "content": f"{self.problem.question}\n{self.opts['instruction']}"}]

    def step(self, action: str) -> StepResult:
        calls = parse_tool_calls(action)
        if not calls:
            return answer_step(self, action)
        limit = int(self.opts["max_calls_per_turn"])
        results = [run_tool_call(c, self.cfg.sandbox, self.tools) for c in calls[:limit]]
        parts = [tool_response(r) for r in results]
        if len(calls) > limit:
            parts.append(f"[{len(calls) - limit} further tool call(s) refused: at most {limit} per turn]")
        return StepResult([{"role": "user", "content": "\n".join(parts)}], 0.0, False,
                          {"tool_calls": len(results), "tool_failures": sum(not r.ok for r in results)})
