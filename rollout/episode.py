"""Multi-turn episodes, token in, token out.

A turn: the engine samples the assistant's tokens from the episode's ids so far; their decoded text goes
to `Environment.step`; the observation messages that come back are tokenised once, on arrival, as the
chat template's incremental suffix (`TurnEncoder.observation_ids`: the end of the assistant turn the
sampled tokens did not already hold, the observation turns, the next generation prompt) and appended.
The conversation is never re-tokenised as a whole, so an episode's response ids are exactly the
sampled ids plus the observation ids, and the behaviour logprobs are those of the tokens trained on.

A `buffer.Sample` of an episode: ``prompt_ids`` = the opening messages with the generation prompt;
``response_ids`` = every later token; ``loss_mask`` 1 on sampled tokens, 0 on observation tokens
(behaviour logprob 0.0 and the previous token's policy version there, both unused); ``reward`` = the sum of
``turn_rewards``; ``status`` ``completed`` when the environment ended the episode, ``truncated`` when a limit
did or when the last turn was cut at its token budget, ``failed`` when the environment or the reward function
failed (kept, never trained on: loss mask all zero). A single-turn task is the one-turn case (``single_turn``
environment): the rollout worker has no other generation path.

Left out on purpose: the OpenAI-messages path (an episode whose text is re-rendered by a server).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from buffer import Sample

if TYPE_CHECKING:
    from rollout.engine import Completion
    from rollout.envs import EnvConfig, Environment, Message

logger = logging.getLogger(__name__)

_PLACEHOLDER = "\u2063relayrl-assistant-turn\u2063"

# (prompts, samples per prompt, max new tokens) -> (completions per prompt, policy version per token)
SampleFn = Callable[[list[list[int]], list[int], int], "tuple[list[list[Completion]], list[list[list[int]]]]"]


class TurnEncoder:
    """Token ids of an episode's opening and of each observation, from the tokenizer's chat template.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.

    Raises:
        ValueError: the template is not incremental (rendering more messages changes the text of the
            earlier ones), so no observation suffix exists; the message names the rendered prefix.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        base = [{"role": "user", "content": "u"}, {"role": "assistant", "content": _PLACEHOLDER}]
        self._base = base
        self._prefix = self._render(base, False)
        at = self._prefix.rfind(_PLACEHOLDER)
        if at < 0:
            raise ValueError("the chat template drops assistant content; it cannot render an episode")
        self.turn_close = self._prefix[at + len(_PLACEHOLDER):]  # e.g. "<|im_end|>\n" for ChatML
        self._special = {i: tokenizer.decode([i]) for i in tokenizer.all_special_ids}

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens added."""
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Ids of the opening messages plus the generation prompt."""
        return self.encode(self._render(messages, True))

    def observation_text(self, messages: list[Message], last_sampled_id: int | None) -> str:
        """Text appended after the assistant's sampled tokens: what closes its turn (less a stop token it
        sampled itself), the observation turns and the next generation prompt."""
        full = self._render(self._base + list(messages), True)
        if not full.startswith(self._prefix):
            raise ValueError(f"chat template is not incremental: appending {len(messages)} message(s) changed "
                             f"the rendered conversation before them (prefix {self._prefix[-80:]!r})")
        close = self.turn_close
        stop = self._special.get(last_sampled_id) if last_sampled_id is not None else None
        if stop and close.startswith(stop):
            close = close[len(stop):]
        return close + full[len(self._prefix):]

    def observation_ids(self, messages: list[Message], last_sampled_id: int | None) -> list[int]:
        """`observation_text`, tokenised once."""
        return self.encode(self.observation_text(messages, last_sampled_id))


@dataclass
class Episode:
    """One episode's state; ``response_ids`` and its three per-token lists grow together."""

    env: Environment
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    behaviour_logprobs: list[float] = field(default_factory=list)
    policy_versions: list[int] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)  # the assistant's turns, decoded
    status: str = "running"  # then completed | truncated | failed
    error: str = ""
    reward_error: str = ""  # the reward function failed (the episode is then failed, not an environment failure)
    finish_reason: str = ""  # of the last sampled turn: "stop", "length", ...
    correct: bool = False
    tool_failures: int = 0
    reward_terms: dict[str, float | None] = field(default_factory=dict)  # per reward function, summed over turns
    reward_failed: set[str] = field(default_factory=set)  # reward functions that failed on this episode

    @property
    def reward(self) -> float:
        """Sum of the turn rewards."""
        return float(sum(self.turn_rewards))

    def to_sample(self, prompt_id: str, group_id: str, answer: str) -> Sample:
        """The `buffer.Sample` of the finished episode (a failed one is kept but masked out)."""
        mask = [0] * len(self.response_ids) if self.status == "failed" else self.loss_mask
        prompt = self.prompt_ids or [0]  # a failed reset has no prompt: one placeholder token keeps the record whole
        return Sample(prompt_id=prompt_id, group_id=group_id, prompt_ids=prompt,
                      response_ids=self.response_ids, behaviour_logprobs=self.behaviour_logprobs,
                      policy_versions=self.policy_versions, loss_mask=mask, reward=self.reward,
                      status=self.status, answer=answer, response_text="\n".join(self.texts),
                      correct=self.correct, error=self.error, turn_rewards=list(self.turn_rewards))


def run_episodes(episodes: list[list[Episode]], seeds: list[int], sample: SampleFn, encoder: TurnEncoder,
                 cfg: EnvConfig, max_tokens: int, max_model_len: int) -> None:
    """Play every episode to its end, in place. ``episodes[g]`` share the reset seed ``seeds[g]`` (a GRPO group).

    Each turn samples all live episodes in as few engine calls as possible (episodes with equal ids so far
    share one request with ``n`` samples, so a group's first turn is one request). Episodes end when the
    environment says done (``completed``), at ``cfg.max_turns``, ``cfg.max_episode_tokens``, ``max_model_len`` or
    ``cfg.episode_timeout_s`` (``truncated``), or when ``reset``/``step`` raises or outlasts
    ``cfg.step_timeout_s`` (``failed``, ``error`` says why; a call that outlasts it is abandoned, its thread
    left running, and ``close`` is still called). Never raises for one episode's failure.

    Args:
        sample: ``(prompts, n per prompt, max new tokens) -> (completions, per-token policy versions)``.
        max_tokens: sampled tokens per turn, max.
        max_model_len: prompt + response tokens the engine accepts.

    Raises:
        RuntimeError: more than ``cfg.max_hung_steps`` abandoned calls of earlier episodes still run in this
            process (threads cannot be killed; each may hold the environment's resources); names the environment.
    """
    hung = hung_steps()
    if hung > cfg.max_hung_steps:
        raise RuntimeError(f"environment {cfg.type!r}: {hung} reset/step calls abandoned after rollout.env.step_timeout_s "
                           f"= {cfg.step_timeout_s:g} s still run in this worker (more than rollout.env.max_hung_steps = "
                           f"{cfg.max_hung_steps}); make its step return or raise within the timeout")
    live = [e for group in episodes for e in group]
    pool = ThreadPoolExecutor(max_workers=max(1, min(32, len(live))), thread_name_prefix="env")
    try:
        deadline = time.monotonic() + cfg.episode_timeout_s
        jobs = [(e, pool.submit(e.env.reset, seed)) for g, seed in zip(episodes, seeds) for e in g]
        for e, opening in _collect(jobs, cfg, "reset"):
            if opening is not None:
                e.prompt_ids = encoder.prompt_ids(opening)
        for turn in range(cfg.max_turns):
            live = [e for e in live if e.status == "running"]
            if not live:
                break
            if time.monotonic() > deadline:
                _end(live, "truncated", f"episode time limit of {cfg.episode_timeout_s:g} s")
                break
            _sample_turn(live, sample, cfg, max_tokens, max_model_len)
            stepped = [e for e in live if e.status == "running"]
            results = _collect([(e, pool.submit(e.env.step, e.texts[-1])) for e in stepped], cfg, "step")
            for e, res in results:
                if res is not None:
                    _apply_step(e, res, encoder, cfg, last_turn=turn == cfg.max_turns - 1)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a hung step's thread is abandoned, not joined
        for e in (e for group in episodes for e in group):
            _close(e)


def _sample_turn(live: list[Episode], sample: SampleFn, cfg: EnvConfig, max_tokens: int, max_model_len: int) -> None:
    """Sample one assistant turn for each live episode (one engine call per distinct token budget)."""
    by_budget: dict[int, dict[tuple[int, ...], list[Episode]]] = {}
    for e in live:
        budget = min(max_tokens, cfg.max_episode_tokens - len(e.response_ids),
                     max_model_len - len(e.prompt_ids) - len(e.response_ids))
        if budget < 1:
            _end([e], "truncated", "")
            continue
        by_budget.setdefault(budget, {}).setdefault(tuple(e.prompt_ids + e.response_ids), []).append(e)
    for budget, contexts in by_budget.items():
        outs, versions = sample([list(c) for c in contexts], [len(es) for es in contexts.values()], budget)
        for es, comps, vers in zip(contexts.values(), outs, versions):
            for e, c, v in zip(es, comps, vers):
                e.response_ids += c.token_ids
                e.behaviour_logprobs += c.logprobs
                e.policy_versions += v
                e.loss_mask += [1] * len(c.token_ids)
                e.texts.append(c.text)
                e.finish_reason = c.finish_reason


def _apply_step(e: Episode, res, encoder: TurnEncoder, cfg: EnvConfig, last_turn: bool) -> None:
    """Record a step's reward and facts; end the episode or append the observation's ids."""
    e.turn_rewards.append(float(res.reward))
    e.correct = bool(res.info.get("correct", e.correct))
    e.tool_failures += int(res.info.get("tool_failures", 0))
    for name, value in res.info.get("reward_terms", {}).items():  # None (not applicable) adds nothing
        old = e.reward_terms.get(name)
        e.reward_terms[name] = value if old is None else old + (value or 0.0)
    e.reward_failed.update(res.info.get("reward_failed", ()))
    if res.info.get("reward_error"):
        e.reward_error = str(res.info["reward_error"])
        _end([e], "failed", f"reward function failed: {e.reward_error}")
        return
    if res.done:
        e.status = "truncated" if e.finish_reason == "length" else "completed"
        return
    if last_turn:
        e.status = "truncated"
        return
    try:
        obs = encoder.observation_ids(res.observation, e.response_ids[-1] if e.response_ids else None)
    except ValueError as err:
        _end([e], "failed", f"observation could not be encoded: {err}")
        return
    if len(e.response_ids) + len(obs) >= cfg.max_episode_tokens:
        e.status = "truncated"
        return
    e.response_ids += obs
    e.behaviour_logprobs += [0.0] * len(obs)
    e.policy_versions += [e.policy_versions[-1] if e.policy_versions else 0] * len(obs)
    e.loss_mask += [0] * len(obs)


def _collect(jobs: list, cfg: EnvConfig, what: str) -> list[tuple[Episode, Any]]:
    """Wait for each ``(episode, future)``; a raise or a timeout fails that episode and yields None."""
    out, deadline = [], time.monotonic() + cfg.step_timeout_s
    for e, fut in jobs:
        try:
            out.append((e, fut.result(timeout=max(0.0, deadline - time.monotonic()))))
        except FutureTimeout:
            _ABANDONED.append(fut)
            _end([e], "failed", f"environment {cfg.type!r}: {what} took longer than rollout.env.step_timeout_s = "
                 f"{cfg.step_timeout_s:g} s")
            out.append((e, None))
        except Exception as err:  # noqa: BLE001 - any error of environment code fails that episode only
            _end([e], "failed", f"environment {cfg.type!r}: {what} raised {type(err).__name__}: {err}"[:500])
            out.append((e, None))
    return out


_ABANDONED: list = []  # futures of reset/step calls that outlived step_timeout_s (their threads run on)


def hung_steps() -> int:
    """Environment calls of this process abandoned after ``step_timeout_s`` and still running."""
    _ABANDONED[:] = [f for f in _ABANDONED if not f.done()]
    return len(_ABANDONED)


def _end(es: list[Episode], status: str, error: str) -> None:
    for e in es:
        e.status, e.error = status, error
        if status == "failed":
            logger.warning("episode failed: %s", error)


def _close(e: Episode) -> None:
    try:
        e.env.close()
    except Exception as err:  # noqa: BLE001 - a failing close must not hide the episode's result
        logger.warning("environment close raised %s: %s", type(err).__name__, err)
