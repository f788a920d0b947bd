"""The caller's side of a reward-model pool: `RewardModelClient`, and how code in any process of a run reaches it.

Callers: a ``[[rollout.rewards]]`` entry ``fn = "reward_model:<name>"`` (`reward_model_reward`: a sample whose
item fails fails its reward, counted as that reward's failure and never trained on), or user code in a reward
function or environment: ``from rollout.reward_models import reward_model`` then
``reward_model("<name>").score(prompts, completions, **columns) -> list[float | None]``. A rollout worker finds
the pools of its run through the environment variable ``RELAYRL_REWARD_MODELS`` (`reward_models_env`, set by
the group on its workers) and the servers by their Ray actor names. One client per pool and process is cached
here (`reward_model`; a `rollout.reward_models.pool.RewardModelPool` registers its own).

A caller waits at most ``timeout_s`` per call; past it the call's items score None (the call is cancelled on the
server, which skips items whose caller gave up, or aborts them in a judge's engine) and the pool goes on. A chunk
whose server died (killed by a pool that shrank, crashed) is sent once more to a live server within the same
deadline, so a pool can shrink while calls are in flight.

Left out on purpose: load balancing beyond "fewest calls in flight from this process".
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from rollout.reward_models.config import ENV_VAR
from rollout.reward_models.text import _text

if TYPE_CHECKING:
    from rollout.reward_models.pool import RewardModelPool
    from rollout.reward_models.server import RewardModelServer


class RewardModelClient:
    """Calls one pool from any process of the run (a rollout worker, a reward thread, the driver).

    Items are sent in chunks of ``batch_size`` to the servers with the fewest calls in flight from this process
    and waited for together, at most ``timeout_s``. The servers are found by their Ray actor names (prefix
    ``prefix``), looked up again every ``refresh_s`` seconds (a pool that grew) and after a server failed.

    Args:
        name: the pool's name.
        prefix: its servers' actor-name prefix (a Ray pool), or None with ``local``.
        timeout_s: seconds a `score` call waits by default.
        batch_size: items per chunk.
        fields: the names its template fills (the columns a call must give).
        local: the servers themselves (an in-process pool; no timeout applies there).
    """

    refresh_s = 10.0

    def __init__(self, name: str, prefix: str | None, timeout_s: float, batch_size: int,
                 fields: Sequence[str] = (), local: Sequence[RewardModelServer] | None = None) -> None:
        self.name, self.prefix, self.timeout_s, self.batch_size = name, prefix, timeout_s, batch_size
        self.fields, self.local = tuple(fields), list(local) if local is not None else None
        self.counts: Counter = Counter()
        self.last_failure = ""
        self._lock = threading.Lock()
        self._actors: dict[str, Any] = {}
        self._inflight: Counter = Counter()
        self._listed = -math.inf
        self._dead: dict[str, float] = {}  # server name -> when a call found it dead (monotonic seconds)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any], timeout_s: float | None = None,
              **columns: Sequence[Any]) -> list[float | None]:
        """`score_explained` without the reason."""
        return self.score_explained(prompts, completions, timeout_s, **columns)[0]

    def score_explained(self, prompts: Sequence[Any], completions: Sequence[Any], timeout_s: float | None = None,
                        **columns: Sequence[Any]) -> tuple[list[float | None], str]:
        """Score each completion of its prompt: TRL's reward-function arguments in, one value per completion out.

        Args:
            prompts: N prompts (text, or TRL conversational message lists: their contents are joined).
            completions: N completions, the same way.
            timeout_s: seconds to wait, at most (default: the pool's ``timeout_s``).
            **columns: the samples' other columns, N values each (``answer=[...]``); the template's fields must
                be among them.

        Returns:
            ``(scores, why)``: N scores, None for an item that failed (timed out, its server failed, no verdict in
            the judge's answer; counted in `stats`), and why one failed (``""`` when none did).

        Raises:
            ValueError: prompts, completions or a column of another length than N, or a template field no
                argument fills (one line).
        """
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"reward model {self.name!r}: {len(prompts)} prompts for {n} completions; give one "
                             "prompt per completion")
        missing = [f for f in self.fields if f not in ("prompt", "completion") and f not in columns]
        if missing:
            raise ValueError(f"reward model {self.name!r}: its template needs column(s) {missing}, the call gave "
                             f"{sorted(columns) or 'none'}; pass them as keywords (reward functions get every column)")
        wanted = [f for f in self.fields if f in columns]
        for k in wanted:
            if len(columns[k]) != n:
                raise ValueError(f"reward model {self.name!r}: column {k!r} has {len(columns[k])} values for {n} "
                                 "completions")
        items = [{"prompt": _text(p), "completion": _text(c), "columns": {k: columns[k][i] for k in wanted}}
                 for i, (p, c) in enumerate(zip(prompts, completions))]
        return self._score(items, self.timeout_s if timeout_s is None else timeout_s)

    def _score(self, items: list[dict], timeout_s: float) -> tuple[list[float | None], str]:
        """`score` on prepared items: ``(values, why the first failed item failed or "")``."""
        chunks = [items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        if self.local is not None:
            values = [v for i, c in enumerate(chunks) for v in self.local[i % len(self.local)].score_now(c)]
            why = ""
        else:
            values, why = self._score_remote(chunks, timeout_s)
        failed = sum(v is None for v in values)
        if failed:
            why = why or "no score: the judge's answer had no verdict, or the batch raised (see the pool's stats)"
        with self._lock:
            self.counts["calls"] += 1
            self.counts["items"] += len(values)
            self.counts["failed_items"] += failed
            self.last_failure = why or self.last_failure
        return values, why

    def _score_remote(self, chunks: list[list[dict]], timeout_s: float) -> tuple[list[float | None], str]:
        import ray

        deadline = time.time() + timeout_s
        values: list[list[float | None] | None] = [None] * len(chunks)
        why, todo = "", list(range(len(chunks)))
        for attempt in range(2):  # a chunk whose server died goes once more to a live one
            sent = [(k, *self._send(chunks[k], deadline)) for k in todo]  # (chunk index, ref or error, actor name)
            refs = [r for _, r, _ in sent if not isinstance(r, str)]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.time()))
            ready, todo = set(ready), []
            for k, ref, actor_name in sent:
                n = len(chunks[k])
                if isinstance(ref, str):  # no server alive (or its name vanished): this chunk fails
                    why = ref
                    continue
                with self._lock:
                    self._inflight[actor_name] -= 1
                if ref not in ready:
                    ray.cancel(ref)
                    why = f"timed out after {timeout_s:g} s"
                    with self._lock:
                        self.counts["timeouts"] += n
                    continue
                try:
                    values[k] = ray.get(ref, timeout=0)
                except ray.exceptions.RayActorError as e:  # the server died: look again, retry within the deadline
                    with self._lock:
                        self._listed = -math.inf
                        self._dead[actor_name] = time.monotonic()
                        self._actors.pop(actor_name, None)
                    if attempt == 0 and time.time() < deadline:
                        todo.append(k)
                        with self._lock:
                            self.counts["retried"] += n
                        continue
                    why = f"server {actor_name} failed: {type(e).__name__}"
                    with self._lock:
                        self.counts["server_errors"] += n
                except Exception as e:  # noqa: BLE001 - a failing server fails its chunk, not the caller
                    why = f"server {actor_name} failed: {type(e).__name__}"
                    with self._lock:
                        self.counts["server_errors"] += n
                        self._listed = -math.inf  # look the servers up again
            if not todo:
                break
        return [v for k, c in enumerate(chunks) for v in (values[k] if values[k] is not None else [None] * len(c))], why

    def _send(self, chunk: list[dict], deadline: float) -> tuple[Any, str]:
        """``(ref, actor name)`` of ``chunk`` sent to a server, or ``(why not, "")`` when none is alive."""
        try:
            actor_name, actor = self._pick()
        except (RuntimeError, ValueError) as e:
            return str(e), ""
        return actor.score.remote(chunk, deadline), actor_name

    def _pick(self) -> tuple[str, Any]:
        """The server with the fewest calls in flight from this process (its name and handle)."""
        import ray

        with self._lock:
            now = time.monotonic()
            if not self._actors or now - self._listed > self.refresh_s:
                # a server seen dead stays out for refresh_s while others are listed (its name may outlive it a
                # moment; a server Ray restarts keeps its name, and is taken again when it is the only one)
                self._dead = {n: t for n, t in self._dead.items() if now - t < self.refresh_s}
                listed = sorted(n for n in ray.util.list_named_actors() if n.startswith(self.prefix + "-"))
                names = [n for n in listed if n not in self._dead] or listed
                actors = {}
                for n in names:
                    try:
                        actors[n] = self._actors.get(n) or ray.get_actor(n)
                    except ValueError:  # removed since it was listed
                        pass
                self._actors, self._listed = actors, now
            if not self._actors:
                raise RuntimeError(f"reward model {self.name!r}: no server actor named {self.prefix}-* is alive")
            actor_name = min(self._actors, key=lambda n: self._inflight[n])
            self._inflight[actor_name] += 1
            return actor_name, self._actors[actor_name]

    def stats(self) -> dict[str, int]:
        """This process's counters: ``calls``, ``items``, ``failed_items`` (None results), of them ``timeouts``
        and ``server_errors``; ``retried``: items sent again because their server died."""
        with self._lock:
            return {k: int(self.counts[k]) for k in ("calls", "items", "failed_items", "timeouts", "server_errors",
                                                     "retried")}


_CLIENTS: dict[str, RewardModelClient] = {}
_CLIENTS_LOCK = threading.Lock()


def reward_model(name: str) -> RewardModelClient:
    """The client of the run's reward-model pool ``name`` (``[[reward_models]]``), for user reward functions and
    environments: ``reward_model("judge").score(prompts, completions, **columns)``.

    Raises:
        ValueError: no pool of that name reaches this process (one line naming the pools that do).
    """
    with _CLIENTS_LOCK:
        if name not in _CLIENTS:
            for spec in json.loads(os.environ.get(ENV_VAR) or "[]"):
                _CLIENTS.setdefault(spec["name"], RewardModelClient(spec["name"], spec["prefix"], spec["timeout_s"],
                                                                    spec["batch_size"], spec["fields"]))
        if name not in _CLIENTS:
            raise ValueError(f"no reward model pool named {name!r} in this process (have: "
                             f"{sorted(_CLIENTS) or 'none'}); add a [[reward_models]] entry with that name to the run "
                             "config")
        return _CLIENTS[name]


def reward_model_reward(name: str) -> Callable[..., list[float]]:
    """The built-in reward ``fn = "reward_model:<name>"``: TRL's signature, each completion's score from pool
    ``name``. A completion whose score is None raises, so the sample fails its reward (counted as this reward's
    failure, never trained on) rather than counting as 'not applicable'."""

    def score(prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        values, why = reward_model(name).score_explained(prompts, completions, **columns)
        failed = sum(v is None for v in values)
        if failed:
            raise RuntimeError(f"reward model {name!r}: {failed} of {len(values)} item(s) failed ({why})")
        return values

    score.__name__ = score.__qualname__ = f"reward_model_{name}"
    return score


def reward_models_env(pools: Sequence[RewardModelPool]) -> dict[str, str]:
    """The environment variables that let another process's `reward_model` reach ``pools`` (Ray pools only)."""
    specs = [p.spec() for p in pools if not p.in_process]
    return {ENV_VAR: json.dumps(specs)} if specs else {}
