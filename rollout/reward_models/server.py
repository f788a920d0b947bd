"""The reward-model server: one worker of a pool, a Ray async actor (`RewardModelServer`) holding one scorer
(`rollout.reward_models.scoring`).

Calls from several rollout workers (and several threads of one) arrive at a server concurrently; the server runs
them together in batches of up to ``batch_size`` items (waiting ``batch_wait_s`` for more before a partial batch),
one batch at a time in a worker thread. Each call carries its caller's deadline: items not started by then, or
whose call was cancelled (the caller timed out), are skipped and score None; a judge also aborts such items in its
engine while they generate (a scorer with ``abortable``), so an abandoned call leaves the engine idle.

Left out on purpose: restarting a server whose model call hangs (its callers time out, counted, but the server
stays busy until the call returns); stopping a classifier's forward midway.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import math
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from rollout.reward_models.scoring import SCORERS

if TYPE_CHECKING:
    from base.model_source import ModelSource

logger = logging.getLogger(__name__)


class _Call:
    """One caller's items in a server's queue; resolved when every item has a value."""

    def __init__(self, n: int, deadline: float, future: asyncio.Future | None) -> None:
        self.values: list[float | None] = [None] * n
        self.left, self.deadline, self.future, self.cancelled = n, deadline, future, False

    def set(self, i: int, value: float | None) -> None:
        self.values[i] = value
        self.left -= 1
        if self.left == 0 and self.future is not None and not self.future.done():
            self.future.set_result(self.values)


class RewardModelServer:
    """One worker of a reward-model pool: holds the model and scores batches (a Ray async actor).

    Args:
        cfg: `ClassifierRewardModelConfig` or `JudgeRewardModelConfig`.
        model: the model (`base.model_source.ModelSource`, copied to this node when it cannot see it) or a local
            HF model dir.
        index: the worker's slot in its pool.

    Raises:
        FileNotFoundError: the model is not on this node and cannot be copied here.
        ValueError: a classifier ``label`` the model does not have.
    """

    def __init__(self, cfg: Any, model: ModelSource | str, index: int = 0) -> None:
        import torch

        from base.model_source import local_model_dir

        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.cfg, self.index = cfg, index
        t0 = time.perf_counter()
        self.scorer = self.make_scorer(cfg, local_model_dir(model))
        logger.info("reward model %r worker %d up in %.1f s", cfg.name, index, time.perf_counter() - t0)
        self.counts: Counter = Counter()
        self.seconds = 0.0
        self.last_error = ""
        self._queue: list[tuple[_Call, int, dict]] = []
        self._runner: asyncio.Task | None = None
        self._executor = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")

    def make_scorer(self, cfg: Any, model_path: str) -> Any:
        """The scorer of ``cfg.type`` (`SCORERS`) on ``model_path``: anything with ``score_batch(items)``."""
        return SCORERS[cfg.type](cfg, model_path)

    def ping(self) -> int:
        """Its slot; answers once the model is loaded."""
        return self.index

    async def score(self, items: list[dict[str, Any]], deadline: float) -> list[float | None]:
        """Scores of ``items`` (each ``{"prompt", "completion", "columns"}``), batched with other calls.

        Args:
            items: the items; ``columns`` is a dict of the sample's other columns.
            deadline: ``time.time()`` after which the caller no longer waits: items not started by then score
                None (counted as ``expired``).

        Returns:
            One score per item; None where it failed (expired, the batch raised, no verdict).
        """
        call = _Call(len(items), deadline, asyncio.get_running_loop().create_future())
        if not items:
            return []
        self._queue.extend((call, i, it) for i, it in enumerate(items))
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        try:
            return await call.future
        except asyncio.CancelledError:  # the caller gave up (ray.cancel at its timeout): skip its items
            call.cancelled = True
            raise

    def score_now(self, items: list[dict[str, Any]]) -> list[float | None]:
        """Scores of ``items`` in batches of ``batch_size``, in this thread (an in-process pool)."""
        call = _Call(len(items), math.inf, None)
        for start in range(0, len(items), self.cfg.batch_size):
            batch = [(call, i, items[i]) for i in range(start, min(start + self.cfg.batch_size, len(items)))]
            for (c, i, _), v in zip(batch, self._score_batch(batch)):
                c.set(i, v)
        return call.values

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            if len(self._queue) < self.cfg.batch_size and self.cfg.batch_wait_s:
                await asyncio.sleep(self.cfg.batch_wait_s)  # more calls may arrive: one batch, not several
            batch, now = [], time.time()
            while self._queue and len(batch) < self.cfg.batch_size:
                call, i, item = self._queue.pop(0)
                if call.cancelled or now > call.deadline:
                    self.counts["expired"] += 1
                    call.set(i, None)
                else:
                    batch.append((call, i, item))
            if batch:
                values = await loop.run_in_executor(self._executor, self._score_batch, batch)
                for (call, i, _), v in zip(batch, values):
                    call.set(i, v)

    def _score_batch(self, batch: list[tuple[_Call, int, dict]]) -> list[float | None]:
        def abandoned() -> list[int]:  # items of the batch whose caller gave up
            now = time.time()
            return [j for j, (call, _, _) in enumerate(batch) if call.cancelled or now > call.deadline]

        t0 = time.perf_counter()
        try:
            items = [item for _, _, item in batch]
            values = (self.scorer.score_batch(items, abandoned) if getattr(self.scorer, "abortable", False)
                      else self.scorer.score_batch(items))
        except Exception as e:  # noqa: BLE001 - a batch that raises fails its items; the server goes on
            logger.warning("reward model %r: a batch of %d raised %s: %s", self.cfg.name, len(batch),
                           type(e).__name__, e)
            self.last_error = f"{type(e).__name__}: {e}"[:300]
            self.counts["errors"] += len(batch)
            values = [None] * len(batch)
        self.seconds += time.perf_counter() - t0
        self.counts["batches"] += 1
        self.counts["items"] += len(batch)
        self.counts["unscored"] += sum(v is None for v in values)
        return values

    def stats(self) -> dict[str, Any]:
        """Counters since this server started: ``items`` scored (in ``batches``, taking ``seconds``), items
        that scored None (``unscored``: of them ``errors`` in batches that raised), items skipped because their
        caller had given up (``expired``), of the scored ones those a judge aborted in its engine for the same
        reason (``aborted``), ``last_error`` and the judge's ``last_unparsed`` answer; and now: ``queued`` items
        and a judge's engine requests still unfinished (``engine_unfinished``; 0 for a classifier)."""
        unfinished = getattr(self.scorer, "unfinished", None)
        return {**{k: int(self.counts[k]) for k in ("items", "batches", "unscored", "errors", "expired")},
                "aborted": int(getattr(self.scorer, "aborted", 0)), "queued": len(self._queue),
                "engine_unfinished": int(unfinished()) if unfinished is not None else 0,
                "seconds": self.seconds, "last_error": self.last_error,
                "last_unparsed": getattr(self.scorer, "last_unparsed", "")}
