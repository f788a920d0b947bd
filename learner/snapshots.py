"""In-memory snapshots of the learner's training state, for failover without a restart from disk.

Every ``learner.snapshot_every`` steps each rank writes what its checkpoint would hold (`LearnerCheckpoints`:
DeepSpeed's model states, its ZeRO optimizer partition, the LR scheduler, its RNG) into a node-local dir in memory
(``/dev/shm`` where there is one), reads the files back as bytes and hands them to a background thread that sends
them to the run's `SnapshotStore`, an actor on another node than the ranks where the cluster has one. The step
waits for the write alone (``learner/snapshot_seconds``); the send overlaps with the next steps, and a rank starts
a new snapshot only when its previous one has arrived, so the store's newest complete snapshot is at most one
snapshot older than the newest started. After a rank dies the driver starts a new group of ranks, and each rank
restores from the store's newest complete snapshot the files it reads (`learner.checkpointing.rank_checkpoint_files`)
exactly as it would from a checkpoint (`LearnerSnapshots.restore_snapshot`).

The design follows in-memory checkpointing for fault tolerance: Wang et al., "GEMINI: Fast Failure Recovery in
Distributed Training with In-Memory Checkpoints", SOSP 2023 (snapshots of every rank's state in CPU memory of
other machines, recovery from them instead of from remote storage).

Left out on purpose: replicas on more than one node (a rank and the store's node lost together fall back to the
last checkpoint), and snapshots that avoid the serialisation (a copy of the tensors in memory): the write reuses
DeepSpeed's own checkpoint format, the one thing both ZeRO-2 and ZeRO-3 restore exactly.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time

from learner.checkpointing import rank_checkpoint_files
from learner.metrics import Metrics, Reduce

logger = logging.getLogger(__name__)


class SnapshotStore:
    """Holds the learner ranks' snapshots in memory (a Ray actor, ``num_cpus=0``).

    A snapshot of policy ``version`` is complete once all ``num_ranks`` ranks sent their part (``{path relative to
    the snapshot dir: bytes}``). The store keeps the newest complete snapshot and the parts of newer ones, and drops
    everything older, so it holds at most about two snapshots of the learner's state (bytes: see `nbytes`).

    Args:
        num_ranks: learner ranks (``learner.num_learners``), >= 1.

    Raises:
        ValueError: ``num_ranks`` < 1.
    """

    def __init__(self, num_ranks: int) -> None:
        if num_ranks < 1:
            raise ValueError(f"a snapshot store needs num_ranks >= 1, got {num_ranks}")
        self.num_ranks = num_ranks
        self.parts: dict[int, dict[int, dict[str, bytes]]] = {}  # version -> rank -> files

    def put(self, rank: int, version: int, files: dict[str, bytes]) -> int:
        """Store rank ``rank``'s part of the snapshot of ``version``; returns the newest complete version (or -1).

        Raises:
            ValueError: ``rank`` is outside ``[0, num_ranks)``.
        """
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"snapshot part from rank {rank}; this store holds ranks 0..{self.num_ranks - 1}")
        self.parts.setdefault(version, {})[rank] = files
        done = self.latest()
        for v in [v for v in self.parts if v < done]:
            del self.parts[v]
        return done

    def latest(self) -> int:
        """The newest version every rank sent its part of, or -1 when there is none."""
        done = [v for v, ranks in self.parts.items() if len(ranks) == self.num_ranks]
        return max(done, default=-1)

    def names(self, version: int) -> list[str]:
        """Paths of every file of the snapshot of ``version`` (all ranks' parts).

        Raises:
            KeyError: the store holds no complete snapshot of ``version``.
        """
        return sorted({n for files in self._complete(version).values() for n in files})

    def files(self, version: int, names: list[str]) -> dict[str, bytes]:
        """The files ``names`` of the snapshot of ``version``, whichever rank wrote them.

        Raises:
            KeyError: no complete snapshot of ``version``, or a name it lacks.
        """
        merged = {n: b for files in self._complete(version).values() for n, b in files.items()}
        return {n: merged[n] for n in names}

    def nbytes(self) -> int:
        """Bytes held, over every snapshot and rank."""
        return sum(len(b) for ranks in self.parts.values() for files in ranks.values() for b in files.values())

    def _complete(self, version: int) -> dict[int, dict[str, bytes]]:
        ranks = self.parts.get(version, {})
        if len(ranks) != self.num_ranks:
            raise KeyError(f"no complete learner snapshot of version {version} (complete: {self.latest()})")
        return ranks


def snapshot_dir_root(nbytes: int) -> str | None:
    """Where a rank writes a snapshot of about ``nbytes`` bytes before sending it: ``/dev/shm`` (memory) where it is
    writable and has room for twice that (containers often mount a 64 MiB one), else the system's temporary dir
    (None)."""
    shm = "/dev/shm"
    if not (os.path.isdir(shm) and os.access(shm, os.W_OK)):
        return None
    return shm if shutil.disk_usage(shm).free > 2 * nbytes else None


class LearnerSnapshots:
    """The snapshot methods of `learner.worker.LearnerWorker` (a mixin: they use `save_checkpoint` and
    `_load_local` of `learner.checkpointing.LearnerCheckpoints`, ``self.cfg`` and ``self.rank``); every rank
    must call each (DeepSpeed's checkpoint save and load are collective)."""

    _sending: threading.Thread | None = None
    _send_error: str | None = None
    _snapshot_bytes = 2**30  # the last snapshot's size (a guess before the first), to choose where the next goes

    def node_id(self) -> str:
        """The Ray node id of this rank's node (the store goes to another one)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def snapshot(self, store, version: int, timeout_s: float) -> Metrics:
        """Snapshot this rank's training state as policy ``version`` into ``store`` (a `SnapshotStore` actor handle).

        Waits first for this rank's previous snapshot to arrive (bounded by ``timeout_s``), then writes the state
        (`save_checkpoint`) into a dir in memory, reads it back and starts a thread that sends it to the store.

        Returns metrics: ``learner/snapshot_seconds`` (the time the rank was held, the wait for the previous send
        included; max over ranks), ``learner/snapshot_bytes`` (this snapshot's bytes, summed over ranks).

        Raises:
            RuntimeError: the previous send failed (the store died or refused it); the next call tries again.
        """
        t0 = time.perf_counter()
        self.wait_snapshot_sent(timeout_s)
        local = tempfile.mkdtemp(prefix=f"relayrl-snapshot-r{self.rank}-",
                                 dir=snapshot_dir_root(self._snapshot_bytes))
        try:
            self.save_checkpoint(local)
            files = {}
            for root, _, names in os.walk(local):
                for n in names:
                    path = os.path.join(root, n)
                    with open(path, "rb") as f:
                        files[os.path.relpath(path, local).replace(os.sep, "/")] = f.read()
        finally:
            shutil.rmtree(local, ignore_errors=True)
        self._snapshot_bytes = sum(len(b) for b in files.values())
        self._sending = threading.Thread(target=self._send, args=(store, version, files, timeout_s), daemon=True,
                                         name=f"snapshot-send-{version}")
        self._sending.start()
        out = Metrics()
        out.put(Reduce.MAX, {"learner/snapshot_seconds": time.perf_counter() - t0})
        out.put(Reduce.SUM, {"learner/snapshot_bytes": float(self._snapshot_bytes)})
        return out

    def _send(self, store, version: int, files: dict[str, bytes], timeout_s: float) -> None:
        import ray

        try:
            ray.get(store.put.remote(self.rank, version, files), timeout=timeout_s)
        except Exception as e:  # noqa: BLE001 (reported by the next snapshot call, then retried)
            self._send_error = f"{type(e).__name__}: {e}".splitlines()[0]

    def wait_snapshot_sent(self, timeout_s: float) -> bool:
        """Wait (bounded) until this rank's last snapshot reached the store; returns True (also when there was none).

        Raises:
            TimeoutError: it did not arrive within ``timeout_s``.
            RuntimeError: its send failed.
        """
        if self._sending is not None:
            self._sending.join(timeout_s)
            if self._sending.is_alive():
                raise TimeoutError(f"learner rank {self.rank}'s snapshot did not reach the snapshot store within "
                                   f"{timeout_s:.0f} s")
            self._sending = None
        err, self._send_error = self._send_error, None
        if err is not None:
            raise RuntimeError(f"learner rank {self.rank}'s last snapshot did not reach the snapshot store: {err}")
        return True

    def restore_snapshot(self, store, version: int, timeout_s: float) -> bool:
        """Load the snapshot of ``version`` from ``store``: this rank fetches only the files it reads
        (`rank_checkpoint_files`) into a dir in memory and loads them as a checkpoint. Returns True.

        Raises:
            KeyError: the store holds no complete snapshot of ``version``.
            FileNotFoundError: the snapshot lacks a file this rank reads.
            TimeoutError: the store did not answer within ``timeout_s``.
        """
        import ray

        present = ray.get(store.names.remote(version), timeout=timeout_s)
        names = rank_checkpoint_files(self.cfg.zero_stage, self.rank, self.cfg.dtype == "bf16", present)
        if names is None:
            raise FileNotFoundError(f"learner snapshot of version {version} lacks a file rank {self.rank} reads "
                                    f"(has: {', '.join(present)})")
        files = ray.get(store.files.remote(version, names), timeout=timeout_s)
        local = tempfile.mkdtemp(prefix=f"relayrl-restore-r{self.rank}-",
                                 dir=snapshot_dir_root(sum(len(b) for b in files.values())))
        try:
            for n, data in files.items():
                path = os.path.join(local, *n.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            self._load_local(local, f"the learner snapshot of version {version}")
        finally:
            shutil.rmtree(local, ignore_errors=True)
        logger.info("learner rank %d restored the snapshot of version %d (%d files, %.1f MB)", self.rank, version,
                    len(files), sum(len(b) for b in files.values()) / 2**20)
        return True
