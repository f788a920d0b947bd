"""`LearnerFailover`: a learner rank's death costs at most one step, not the run.

Every ``learner.snapshot_every`` steps the ranks snapshot their training state into a `learner.snapshots.SnapshotStore`
actor on another node (right after the step, `learner.LearnerGroup.snapshot_remote`), and the driver keeps each
step's batch (its ObjectRef, held by the replay buffer's node) until a complete snapshot of that step's end version
exists. When a rank dies, `recover` replaces every rank (their process group is broken) in the same placement,
restores the store's newest complete snapshot ``k`` and hands back the kept batches of the steps from ``k`` to the
driver's version, which the driver trains again, so the policy reaches the version it had; the step that was in
flight is then started again on its own batch. Each dispatched group is thus trained once in the policy's history
(a re-trained step repeats a step whose weights died with the ranks) and none is lost.

Where no snapshot can restore the group (``snapshot_every = 0``, or the store died with the rank: its node was lost
too) `recover` raises `LearnerLost`, and `orchestrator.loop.train` resumes the run from its last complete
checkpoint, in the same process. ``learner.max_failovers`` bounds both kinds together.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from learner.group import LearnerRankDied
from learner.metrics import merge
from learner.snapshots import SnapshotStore
from orchestrator.checkpoint import run_stops_for_dead_rank

if TYPE_CHECKING:
    from learner.config import LearnerConfig

logger = logging.getLogger(__name__)


class LearnerLost(RuntimeError):
    """A learner rank died and no snapshot can restore the group (snapshots off, or lost with it); the run can go
    on from its last checkpoint (`orchestrator.loop.train` does so)."""


def rank_died(err: BaseException, learner: Any) -> str | None:
    """Why the learner lost a rank, if ``err`` (raised by a call that involved the learner) means it did: a
    `LearnerRankDied`, or a Ray actor error or timeout while `learner.LearnerGroup.dead_ranks` names a dead rank;
    else None."""
    import ray

    if isinstance(err, LearnerRankDied):
        return str(err)
    if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, TimeoutError)):
        dead = learner.dead_ranks()
        if dead:
            return f"learner rank {dead[0]} died ({type(err).__name__} in a call that involved the learner)"
    return None


class LearnerFailover:
    """Snapshots of the learner group and its recovery from them.

    Args:
        cfg: the learner config (``snapshot_every``, ``max_failovers``, ``num_learners``, ``step_timeout_s``); no
            snapshots are taken with ``max_failovers = 0``.
        learner: the run's `learner.LearnerGroup`.
        run: the run's dir or URI (its last checkpoint is named when the run stops).
    """

    def __init__(self, cfg: LearnerConfig, learner: Any, run: str) -> None:
        self.cfg, self.learner, self.run = cfg, learner, run
        self.every = cfg.snapshot_every if cfg.max_failovers else 0
        self.store = self._start_store() if self.every else None
        self.kept: dict[int, Any] = {}  # version v -> the batch ref of step v -> v + 1, until a snapshot of v + 1
        self.pending: list = []  # snapshot metrics refs not collected yet
        self.failovers = self.retrained = 0
        self.earlier = 0  # failovers of earlier trainers of this run (a checkpoint fallback starts a new trainer)
        self.seconds = 0.0

    def _start_store(self):
        """The store actor, on a node without a learner rank where the cluster has one (soft: Ray may still place it
        with a rank when that node has no room)."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        ranks = set(self.learner.node_ids())
        others = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in ranks)
        strategy = NodeAffinitySchedulingStrategy(others[0], soft=True) if others else "DEFAULT"
        if not others:
            logger.info("learner snapshots are held on a learner rank's node (the cluster has no other): a lost node "
                        "falls back to the last checkpoint")
        return ray.remote(SnapshotStore).options(num_cpus=0, scheduling_strategy=strategy).remote(self.cfg.num_learners)

    def snapshot(self, version: int, due: bool = False) -> None:
        """Start a snapshot of policy ``version`` on every rank (call it right after submitting the step that ends at
        ``version``) when one is due (every ``snapshot_every`` versions, or ``due``: the start of a run)."""
        if self.every and (due or version % self.every == 0):
            if self.store is None:  # lost with a node: a new one, empty until this snapshot arrives
                self.store = self._start_store()
            self.pending.append(self.learner.snapshot_remote(self.store, version))

    def step_started(self, version: int, batch_ref) -> None:
        """The step from ``version`` started on ``batch_ref``: keep the batch, snapshot its end version."""
        self.kept[version] = batch_ref
        self.snapshot(version + 1)

    def latest(self) -> int:
        """The store's newest complete snapshot version; -1 without snapshots or when the store is gone."""
        import ray

        if self.store is None:
            return -1
        try:
            return ray.get(self.store.latest.remote(), timeout=60)
        except (ray.exceptions.RayError, TimeoutError) as e:
            logger.warning("the learner snapshot store is gone (%s); a new one starts with the next snapshot",
                           type(e).__name__)
            self.store, self.pending = None, []
            return -1

    def metrics(self) -> dict[str, float]:
        """``learner/snapshot_*`` of the snapshots finished since the last call (`LearnerSnapshots.snapshot`:
        seconds the ranks were held, bytes), the newest complete snapshot version, and the failover totals; also
        drops the batches a complete snapshot made unnecessary."""
        import ray

        done, still = [], []
        for refs in self.pending:
            (done if not ray.wait(refs, num_returns=len(refs), timeout=0)[1] else still).append(refs)
        self.pending, out = still, {}
        for refs in done:
            try:
                out = merge(ray.get(refs))
            except ray.exceptions.RayError as e:  # a failed send (counted once the next snapshot reports it)
                logger.warning("a learner snapshot failed: %s", str(e).splitlines()[0])
        newest = self.latest()
        for v in [v for v in self.kept if v < newest]:
            del self.kept[v]
        return {**out, "learner/snapshot_version": float(newest),
                "learner/failovers_total": float(self.failovers + self.earlier),
                "learner/failover_retrained_steps_total": float(self.retrained),
                "learner/failover_seconds_total": self.seconds}

    def recover(self, why: str, version: int) -> list[tuple[int, Any]]:
        """Replace the learner's ranks and restore them from the newest complete snapshot ``k``; returns the kept
        batches ``[(v, batch_ref)]`` of the steps ``k .. version - 1`` the driver must train again, oldest first.

        Raises:
            RuntimeError: ``max_failovers`` failovers were made already (the run stops; names the cause and the last
                complete checkpoint).
            LearnerLost: no snapshot can restore the group (the run resumes from its last checkpoint).
        """
        if self.failovers + self.earlier >= self.cfg.max_failovers:
            raise run_stops_for_dead_rank(self.run, f"{why}; learner.max_failovers = {self.cfg.max_failovers} "
                                          "failovers were made already")
        k = self.latest()
        if k < 0 or k > version or any(v not in self.kept for v in range(k, version)):
            held = "snapshots are off (learner.snapshot_every = 0)" if self.every == 0 else f"newest snapshot: {k}"
            raise LearnerLost(f"{why}; no learner snapshot can restore policy version {version} ({held})")
        self.failovers += 1
        logger.warning("%s; replacing the learner ranks and restoring the snapshot of version %d (failover %d of at "
                       "most %d)", why, k, self.failovers, self.cfg.max_failovers)
        self.pending = []  # the dead ranks' snapshot calls
        self.learner.replace_ranks()
        self.learner.restore_snapshot(self.store, k)
        todo = [(v, self.kept[v]) for v in range(k, version)]
        self.retrained += len(todo)
        return todo
