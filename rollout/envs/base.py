"""The `Environment` protocol and its registry (keyed by ``rollout.env.type``: a registered name, or a user's
own subclass by import path ``"pkg.module:Class"``, `environment_class`).

An episode: ``reset(seed)`` returns the opening chat messages; then, turn by turn, the assistant's
text goes to ``step(action)``, which returns the next observation messages, a reward for that turn
and whether the episode is over. Environments deal in text; tokens belong to `rollout.episode`, which
tokenises each observation once, on arrival, and never re-tokenises the conversation.

Left out on purpose: native async environments (the runner calls ``step`` of all live episodes
concurrently, each in a thread bounded by ``rollout.env.step_timeout_s``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from base.user_code import import_object, is_import_path

if TYPE_CHECKING:
    from buffer import Problem
    from rollout.config import DataConfig, RolloutConfig
    from rollout.envs.config import EnvConfig

Message = dict[str, str]  # {"role": "system" | "user" | "assistant" | ..., "content": str}

# (text, reference answer) -> (reward, correct, error); error "" on success, else why the reward function failed
Scorer = Callable[[str, str], "tuple[float, bool, str]"]


def plain_score(text: str, reference: str) -> tuple[float, bool, str]:
    """The default `Scorer`: `rollout.rewards.score_response` (strict exact match), never failing."""
    from rollout.rewards import score_response

    reward, correct = score_response(text, reference)
    return reward, correct, ""


@dataclass
class StepResult:
    """What one `Environment.step` returns.

    Attributes:
        observation: messages appended to the conversation before the next assistant turn (usually one
            user message); ignored when ``done``.
        reward: this turn's reward (unitless; the episode's reward is the sum over its turns).
        done: the episode is over (solved, failed or given up by the environment).
        info: free-form facts for logs and metrics, e.g. ``{"correct": True, "tool_failures": 1}``; the
            runner reads ``correct`` (bool), ``tool_failures`` (int) and ``reward_error`` (str: the reward
            function failed, so the episode is kept but not trained on) when present.
    """

    observation: list[Message]
    reward: float
    done: bool
    info: dict[str, Any] = field(default_factory=dict)


class Environment(ABC):
    """One episode's environment. A new instance per episode; not shared between threads.

    Args:
        problem: the dispatched problem (question, reference answer) the episode is about; an environment
            with its own content (a game) may ignore it and use the reset seed instead. ``problem.columns``
            holds the rest of its data row (e.g. ``{"difficulty": 3, "tests": [...]}``), ``problem.messages`` a
            conversational prompt's messages (`buffer.Problem`).
        options: ``rollout.env.options``: keys the subclass documents; unknown keys raise.
        cfg: the whole `EnvConfig` (sandbox limits for tools, timeouts).

    Attributes:
        score: the run's `Scorer` (the rollout worker's reward function under ``rollout.reward_timeout_s``,
            set by `make_environment`); environments that check an answer against ``problem.answer`` call it.

    Raises:
        ValueError: a bad or unknown option (the message names it and the accepted values).
    """

    score: Scorer = staticmethod(plain_score)

    def __init__(self, problem: Problem, options: dict[str, Any], cfg: EnvConfig) -> None:
        self.problem, self.options, self.cfg = problem, options, cfg

    @abstractmethod
    def reset(self, seed: int) -> list[Message]:
        """Start the episode; returns its opening messages (system/user), without a generation prompt.
        The same seed gives the same messages (a GRPO group's episodes share one seed)."""

    @abstractmethod
    def step(self, action: str) -> StepResult:
        """Take the assistant's decoded turn ``action`` (special tokens removed). May raise: the runner ends
        the episode as ``failed`` and counts it; it may also be abandoned after ``step_timeout_s``."""

    def close(self) -> None:
        """Release what the episode held (subprocesses, files). Called once, also after a failure."""

    @classmethod
    def worker_config(cls, cfg: EnvConfig, rollout: RolloutConfig, data: DataConfig) -> EnvConfig:
        """The `EnvConfig` a rollout worker runs this environment with (default: ``cfg`` as given); an
        environment that takes settings from other sections (``single_turn``: the data section's prompt
        format) fills them in here. Called once per worker, at start."""
        return cfg

    @classmethod
    def check_worker(cls, cfg: EnvConfig) -> str:
        """Check, on the rollout worker's node at start, what episodes will need there (``tool_math``: that the
        sandbox runs tools); returns a line for the worker's log ("" for none).

        Raises:
            RuntimeError: what is missing, named (the worker then fails to start).
        """
        return ""


ENVIRONMENTS: dict[str, type[Environment]] = {}


def register_environment(name: str):
    """Class decorator: make ``cls`` the environment of ``rollout.env.type = name``.

    Raises:
        ValueError: ``name`` is registered already.
    """
    def add(cls: type[Environment]) -> type[Environment]:
        if name in ENVIRONMENTS:
            raise ValueError(f"environment type {name!r} is registered already (by {ENVIRONMENTS[name].__name__})")
        ENVIRONMENTS[name] = cls
        return cls
    return add


def _register_builtins() -> None:
    import rollout.envs.builtin  # noqa: F401 - registers the built-in environments
    import rollout.envs.openenv_env  # noqa: F401 - registers openenv (its package loads per environment)
    import rollout.envs.textarena_env  # noqa: F401 - registers textarena (likewise)


def environment_class(type_: str, field: str = "rollout.env.type") -> type[Environment]:
    """The environment class of ``rollout.env.type = type_``: a registered name (`ENVIRONMENTS`, the built-ins
    included), or a user's `Environment` subclass by import path ``"pkg.module:Class"``.

    Raises:
        ValueError: one line naming ``type_``: an unknown name, an import path that cannot be imported, or an
            object that is not an `Environment` subclass.
    """
    if not is_import_path(type_):
        _register_builtins()
        if type_ not in ENVIRONMENTS:
            raise ValueError(f"{field} = {type_!r} has no registered environment (registered: "
                             f"{', '.join(sorted(ENVIRONMENTS))}; or an import path 'pkg.module:Class' of an "
                             "Environment subclass)")
        return ENVIRONMENTS[type_]
    cls = import_object(type_, field)
    if not (isinstance(cls, type) and issubclass(cls, Environment)) or cls is Environment:
        raise ValueError(f"{field} = {type_!r} is {cls!r}, not a subclass of rollout.envs.Environment; subclass it "
                         "(reset(seed) -> messages, step(action) -> StepResult)")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise ValueError(f"{field} = {type_!r}: {cls.__name__} leaves {', '.join(missing)} abstract; define them")
    return cls


def make_environment(cfg: EnvConfig, problem: Problem, score: Scorer | None = None) -> Environment:
    """A fresh environment of type ``cfg.type`` (`environment_class`) for one episode about ``problem``,
    scoring answers with ``score`` (None: `plain_score`).

    Raises:
        ValueError: ``cfg.type`` names no environment, or its options are bad.
    """
    env = environment_class(cfg.type)(problem, dict(cfg.options), cfg)
    if score is not None:
        env.score = score
    return env


def check_options(env: str, options: dict[str, Any], known: dict[str, Any]) -> dict[str, Any]:
    """``known`` (defaults) updated with ``options``; raises ValueError naming an unknown key."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"rollout.env.options for {env!r}: unknown key(s) {unknown}; accepted: {sorted(known)}")
    return {**known, **options}
