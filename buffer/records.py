"""Records that cross actor boundaries besides `Sample`: the work order and the receipt of a rollout.

The driver (orchestrator/) sends a `GenerateRequest` to a rollout worker (rollout/); the worker writes
its sample groups straight into the replay buffer and returns a `RolloutResult`, small metadata the
driver accounts. The buffer answers a batch request with the groups and a `BatchStats`. They live here,
beside `Sample`, so producers and consumers depend on this package and not on each other.

Left out on purpose: the samples themselves travel as `Sample` lists, never inside these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    """A prompt with its reference answer; ``prompt_id`` is stable across runs (``split/index``).

    Attributes:
        question: the prompt text (a conversational prompt: its last user message's content).
        answer: the reference answer as text ("" when the data has none).
        messages: a conversational prompt's own chat messages (``{"role", "content"}`` dicts), rendered with
            the model's chat template as given; () for a text prompt, which relayrl's prompt builder renders.
        columns: the data row's other columns (JSON values: checkpoints store in-flight problems as JSON),
            handed to reward functions as keywords and to environments as ``problem.columns``.
    """

    prompt_id: str
    question: str
    answer: str
    messages: tuple[dict[str, str], ...] = field(default=(), hash=False)
    columns: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "messages", tuple(dict(m) for m in self.messages))  # JSON gives lists


@dataclass(frozen=True)
class GenerateRequest:
    """One generate call: a group per problem, each under its own group id.

    Attributes:
        problems: P problems.
        keys: P unique group ids (``g<dispatch number>``).
        sizes: P group sizes in samples (uniform or Knapsack RL budgets).
        min_version: oldest policy version allowed to generate these groups (admission control).
        seed: sampling seed of the request.

    Raises:
        ValueError: ``keys`` or ``sizes`` do not have one entry per problem.
    """

    problems: tuple[Problem, ...]
    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    min_version: int
    seed: int

    def __post_init__(self) -> None:
        for name in ("problems", "keys", "sizes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not len(self.problems) == len(self.keys) == len(self.sizes):
            raise ValueError(f"GenerateRequest: {len(self.problems)} problems, {len(self.keys)} keys and "
                             f"{len(self.sizes)} sizes: give one key and one size per problem")

    def without(self, done: set[str]) -> GenerateRequest | None:
        """This request minus the groups whose ids are in ``done``; None when nothing is left."""
        todo = [i for i, k in enumerate(self.keys) if k not in done]
        if not todo:
            return None
        return GenerateRequest(tuple(self.problems[i] for i in todo), tuple(self.keys[i] for i in todo),
                               tuple(self.sizes[i] for i in todo), self.min_version, self.seed)

    def to_dict(self) -> dict:
        """Plain JSON-able form (checkpoints)."""
        return {"problems": [vars(p) for p in self.problems], "keys": list(self.keys), "sizes": list(self.sizes),
                "min_version": self.min_version, "seed": self.seed}

    @classmethod
    def from_dict(cls, d: dict) -> GenerateRequest:
        """Inverse of `to_dict`."""
        return cls(tuple(Problem(**p) for p in d["problems"]), tuple(d["keys"]), tuple(d["sizes"]),
                   int(d["min_version"]), int(d["seed"]))


@dataclass(frozen=True)
class RolloutResult:
    """What a rollout worker reports for one `GenerateRequest` (its samples went to the buffer).

    Attributes:
        worker: slot index of the worker.
        kept_keys: ids of the groups the buffer stored (dynamic sampling may filter some).
        group_rewards: ``(prompt_id, rewards)`` of every generated group, in request order; rewards of
            samples whose reward function failed are left out.
        samples: samples generated.
        tokens: response tokens sampled (observation tokens of episodes excluded).
        reward_failures: samples whose reward function failed (never trained on).
        mixed_version_samples: samples whose tokens span several policy versions (in-flight updates).
        load_seconds: seconds spent loading staged weights during the request.
        env_failures: episodes that failed in their environment (reset/step raised or timed out).
        tool_failures: tool calls that failed (crash, timeout, limit, malformed call) in those episodes.
        turns: assistant turns generated (equals ``samples`` for single-turn work).
        reward_terms: per reward function of the run (``rollout.rewards``), ``(name, sum of its unweighted
            values, samples it applied to (returned a value, not None), samples it failed)``.
    """

    worker: int
    kept_keys: tuple[str, ...]
    group_rewards: tuple[tuple[str, tuple[float, ...]], ...]
    samples: int
    tokens: int
    reward_failures: int
    mixed_version_samples: int
    load_seconds: float
    env_failures: int = 0
    tool_failures: int = 0
    turns: int = 0
    reward_terms: tuple[tuple[str, float, int, int], ...] = ()


@dataclass(frozen=True)
class BatchStats:
    """What the buffer reports with a batch: ``metrics`` (``off_policy/*``, ``buffer/*``, ``curation/*``),
    ``group_ids`` of the groups handed out and ``replayed_ids``, the groups of the self-imitation replays that
    joined it (one per replayed sample; trained before, not new dispatches), for the driver's audit log."""

    metrics: dict[str, float] = field(default_factory=dict)
    group_ids: tuple[str, ...] = ()
    replayed_ids: tuple[str, ...] = ()
