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

Environment calls run in a `CallPool`: each call may run ``rollout.env.step_timeout_s`` from the moment a thread
takes it up (not from when the turn queued it), so episodes queued behind busy threads get their whole budget. A
call past its budget fails its episode and is abandoned (a Python thread cannot be killed); once more than
``rollout.env.max_hung_steps`` of them still run in one worker (0: the first), the request that abandoned the last
one, or else the worker's next request, raises `HungWorkerError` (`check_hung`) and the orchestrator restarts that
worker and re-issues the request's groups (`orchestrator.dispatch`).

Left out on purpose: the OpenAI-messages path (an episode whose text is re-rendered by a server).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from buffer import Sample

if TYPE_CHECKING:
    from rollout.engine import Completion
    from rollout.envs import EnvConfig, Environment, Message

logger = logging.getLogger(__name__)

_PLACEHOLDER = "\u2063relayrl-assistant-turn\u2063"

ENV_THREADS = 32  # environment calls of one request that run at once, max
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


class HungWorkerError(RuntimeError):
    """A rollout worker holds more than ``rollout.env.max_hung_steps`` environment calls abandoned past
    ``rollout.env.step_timeout_s`` that still run (their threads cannot be killed). Raised by `run_episodes` before
    it plays anything; the orchestrator restarts the worker and re-issues the request (`orchestrator.dispatch`)."""


def check_hung(cfg: EnvConfig) -> None:
    """Refuse to go on in a worker that holds more than ``cfg.max_hung_steps`` environment calls abandoned past
    ``cfg.step_timeout_s`` and still running (`hung_steps`).

    Raises:
        HungWorkerError: one line naming the environment, the count and both settings.
    """
    hung = hung_steps()
    if hung > cfg.max_hung_steps:
        raise HungWorkerError(f"environment {cfg.type!r}: {hung} reset/step calls abandoned after "
                              f"rollout.env.step_timeout_s = {cfg.step_timeout_s:g} s still run in this worker (more "
                              f"than rollout.env.max_hung_steps = {cfg.max_hung_steps})")


def run_episodes(episodes: list[list[Episode]], seeds: list[int], sample: SampleFn, encoder: TurnEncoder,
                 cfg: EnvConfig, max_tokens: int, max_model_len: int) -> None:
    """Play every episode to its end, in place. ``episodes[g]`` share the reset seed ``seeds[g]`` (a GRPO group).

    Each turn samples all live episodes in as few engine calls as possible (episodes with equal ids so far
    share one request with ``n`` samples, so a group's first turn is one request). Episodes end when the
    environment says done (``completed``), at ``cfg.max_turns``, ``cfg.max_episode_tokens``, ``max_model_len`` or
    ``cfg.episode_timeout_s`` (``truncated``), or when ``reset``/``step`` raises or runs longer than
    ``cfg.step_timeout_s`` from when a thread took it up (``failed``, ``error`` says why; a call past it is
    abandoned, its thread left running, and ``close`` is still called). At most `ENV_THREADS` calls run at once.
    Never raises for one episode's failure.

    Args:
        sample: ``(prompts, n per prompt, max new tokens) -> (completions, per-token policy versions)``.
        max_tokens: sampled tokens per turn, max.
        max_model_len: prompt + response tokens the engine accepts.

    Raises:
        HungWorkerError: more than ``cfg.max_hung_steps`` abandoned calls of earlier episodes still run in this
            process (each may hold the environment's resources); names the environment. Nothing was played.
    """
    check_hung(cfg)
    live = [e for group in episodes for e in group]
    pool = CallPool(max(1, min(ENV_THREADS, len(live))), cfg.step_timeout_s, "env")
    try:
        deadline = time.monotonic() + cfg.episode_timeout_s
        jobs = [(e, pool.submit(e.env.reset, seed)) for g, seed in zip(episodes, seeds) for e in g]
        for e, opening in _collect(pool, jobs, cfg, "reset"):
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
            results = _collect(pool, [(e, pool.submit(e.env.step, e.texts[-1])) for e in stepped], cfg, "step")
            for e, res in results:
                if res is not None:
                    _apply_step(e, res, encoder, cfg, last_turn=turn == cfg.max_turns - 1)
    finally:
        pool.shutdown()  # a hung call's thread is abandoned, not joined
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


def _collect(pool: CallPool, jobs: list[tuple[Episode, Call]], cfg: EnvConfig,
             what: str) -> list[tuple[Episode, Any]]:
    """Wait for each ``(episode, call)``; a raise, a timeout or a call that cannot start fails that episode and
    yields None."""
    out = []
    for (e, call), (kind, value) in zip(jobs, pool.wait([c for _, c in jobs])):
        if kind == "ok":
            out.append((e, value))
            continue
        if kind == "timed_out":
            _ABANDONED.append(call.future)
            why = f"{what} took longer than rollout.env.step_timeout_s = {cfg.step_timeout_s:g} s"
        elif kind == "not_started":
            why = (f"{what} never started: all {pool.threads} environment threads of this request hold calls past "
                   f"rollout.env.step_timeout_s = {cfg.step_timeout_s:g} s")
        else:
            why = f"{what} raised {type(value).__name__}: {value}"
        _end([e], "failed", f"environment {cfg.type!r}: {why}"[:500])
        out.append((e, None))
    return out


_ABANDONED: list[cf.Future] = []  # futures of reset/step calls that outlived step_timeout_s (their threads run on)


def hung_steps() -> int:
    """Environment calls of this process abandoned after ``step_timeout_s`` and still running."""
    _ABANDONED[:] = [f for f in _ABANDONED if not f.done()]
    return len(_ABANDONED)


class Call:
    """One call submitted to a `CallPool`: its future and when a thread took it up (``started``, monotonic
    seconds; None while it waits for a thread)."""

    def __init__(self, pool: cf.ThreadPoolExecutor, fn: Callable[..., Any], args: tuple) -> None:
        self.started: float | None = None

        def job():
            self.started = time.monotonic()
            return fn(*args)

        self.future = pool.submit(job)


class CallPool:
    """Threads that run calls, each bounded by ``timeout_s`` from the moment a thread takes it up, not from when it
    was submitted: with more calls than threads, the later ones start as earlier ones finish and still get their
    whole budget. A call past its budget is abandoned (a Python thread cannot be killed: it keeps its thread), so a
    call queued behind ``threads`` abandoned calls can never start; `wait` reports it as such at once instead of
    waiting for ever.

    Args:
        threads: calls that run at once, max (>= 1).
        timeout_s: seconds each call may run, from its start.
        name: thread name prefix.
    """

    def __init__(self, threads: int, timeout_s: float, name: str = "call") -> None:
        self.threads, self.timeout_s = threads, timeout_s
        self._pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.abandoned: list[cf.Future] = []  # calls of this pool past their budget (done or not)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Call:
        """Queue ``fn(*args)``; returns its `Call`."""
        return Call(self._pool, fn, args)

    def wait(self, calls: list[Call], poll_s: float = 0.05) -> list[tuple[str, Any]]:
        """Wait for ``calls`` (of this pool), each within ``timeout_s`` of its start. Returns, per call in order,
        ``("ok", value)``, ``("raised", exception)``, ``("timed_out", None)`` (abandoned, still running) or
        ``("not_started", None)`` (cancelled: every thread of the pool holds an abandoned call). Never raises
        the calls' errors. ``poll_s``: how often queued calls are looked at for having started."""
        out: list[tuple[str, Any] | None] = [None] * len(calls)
        pending = dict(enumerate(calls))
        while pending:
            now = time.monotonic()
            for i, c in list(pending.items()):
                if c.future.done():
                    err = c.future.exception()
                    out[i] = ("raised", err) if err is not None else ("ok", c.future.result())
                    del pending[i]
                elif c.started is not None and now >= c.started + self.timeout_s:
                    self.abandoned.append(c.future)
                    out[i] = ("timed_out", None)
                    del pending[i]
            queued = [i for i, c in pending.items() if c.started is None]
            if queued and len(queued) == len(pending) and self.stuck():
                for i in queued:
                    if pending[i].future.cancel():  # False: a thread took it up just now
                        out[i] = ("not_started", None)
                        del pending[i]
                continue
            deadlines = [c.started + self.timeout_s for c in pending.values() if c.started is not None]
            wait_s = min(deadlines, default=now + poll_s) - now
            if queued:  # a queued call starts when a thread frees, which may be an abandoned call's
                wait_s = min(wait_s, poll_s)
            cf.wait([c.future for c in pending.values()], timeout=max(0.0, wait_s), return_when=cf.FIRST_COMPLETED)
        return out  # type: ignore[return-value]

    def stuck(self) -> bool:
        """Whether every thread of the pool holds an abandoned call that still runs."""
        return sum(not f.done() for f in self.abandoned) >= self.threads

    def shutdown(self) -> None:
        """Cancel queued calls and return at once (running ones, abandoned or not, keep their threads)."""
        self._pool.shutdown(wait=False, cancel_futures=True)


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
