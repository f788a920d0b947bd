"""The caller's side of a reward-model pool: `RewardModelClient`, and how code in any process of a run reaches it.

Callers: a ``[[rollout.rewards]]`` entry ``fn = "reward_model:<name>"`` (`reward_model_reward`: a sample whose
item fails fails its reward, counted as that reward's failure and never trained on), or user code in a reward
function or environment: ``from rollout.reward_models import reward_model`` then
``reward_model("<name>").score(prompts, completions, **columns) -> list[float | None]``. A rollout worker finds
the pools of its run through the environment variable ``RELAYRL_REWARD_MODELS`` (`reward_models_env`, set by
the group on its workers) and the servers by their Ray actor names. One client per pool and process is cached
here (`reward_model`; a `rollout.reward_models.pool.RewardModelPool` registers its own).

A caller waits at most ``timeout_s`` per call; past it the call's items score None (the call is cancelled on the
server, which skips items whose caller gave up) and the pool goes on.

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
        sent = []  # (ref or None, actor name, chunk)
        why = ""
        for chunk in chunks:
            try:
                actor_name, actor = self._pick()
                sent.append((actor.score.remote(chunk, deadline), actor_name, chunk))
            except (RuntimeError, ValueError) as e:  # no server alive (or its name vanished): this chunk fails
                sent.append((None, "", chunk))
                why = str(e)
        refs = [r for r, _, _ in sent if r is not None]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=max(0.0, deadline - time.time()))
        ready = set(ready)
        out: list[float | None] = []
        for ref, actor_name, chunk in sent:
            values: list[float | None] = [None] * len(chunk)
            if ref is None:
                pass
            elif ref not in ready:
                ray.cancel(ref)
                why = f"timed out after {timeout_s:g} s"
                with self._lock:
                    self.counts["timeouts"] += len(chunk)
            else:
                try:
                    values = ray.get(ref, timeout=0)
                except Exception as e:  # noqa: BLE001 - a dead or failing server fails its chunk, not the caller
                    why = f"server {actor_name} failed: {type(e).__name__}"
                    with self._lock:
                        self.counts["server_errors"] += len(chunk)
                        self._listed = -math.inf  # look the servers up again
            if ref is not None:
                with self._lock:
                    self._inflight[actor_name] -= 1
            out += values
        return out, why

    def _pick(self) -> tuple[str, Any]:
        """The server with the fewest calls in flight from this process (its name and handle)."""
        import ray

        with self._lock:
            if not self._actors or time.monotonic() - self._listed > self.refresh_s:
                names = sorted(n for n in ray.util.list_named_actors() if n.startswith(self.prefix + "-"))
                self._actors = {n: self._actors.get(n) or ray.get_actor(n) for n in names}
                self._listed = time.monotonic()
            if not self._actors:
                raise RuntimeError(f"reward model {self.name!r}: no server actor named {self.prefix}-* is alive")
            actor_name = min(self._actors, key=lambda n: self._inflight[n])
            self._inflight[actor_name] += 1
            return actor_name, self._actors[actor_name]

    def stats(self) -> dict[str, int]:
        """This process's counters: ``calls``, ``items``, ``failed_items`` (None results), of them ``timeouts``
        and ``server_errors``."""
        with self._lock:
            return {k: int(self.counts[k]) for k in ("calls", "items", "failed_items", "timeouts", "server_errors")}


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
