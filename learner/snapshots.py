"""In-memory snapshots of the learner's training state, for failover without a restart from disk.

Every ``learner.snapshot_every`` steps each rank runs its checkpoint save (`LearnerCheckpoints.save_checkpoint`:
DeepSpeed's model states, its ZeRO optimizer partition, the LR scheduler, its RNG) with a `MemoryCheckpointEngine`,
which copies DeepSpeed's state dicts in memory instead of serialising them to files, and a background thread sends
the copy to the run's `SnapshotStore`, an actor on another node than the ranks where the cluster has one. The step
waits for the copy alone (``learner/snapshot_seconds``); the send overlaps with the next steps, and a rank starts
a new snapshot only when its previous one has arrived, so the store's newest complete snapshot is at most one
snapshot older than the newest started. After a rank dies the driver starts a new group of ranks, and each rank
loads from the store's newest complete snapshot the parts it reads (`learner.checkpointing.rank_checkpoint_files`)
through DeepSpeed's own checkpoint load, served from memory (`LearnerSnapshots.restore_snapshot`).

The design follows in-memory checkpointing for fault tolerance: Wang et al., "GEMINI: Fast Failure Recovery in
Distributed Training with In-Memory Checkpoints", SOSP 2023 (snapshots of every rank's state in CPU memory of
other machines, recovery from them instead of from remote storage).

Left out on purpose: replicas on more than one node (a rank and the store's node lost together fall back to the
last checkpoint), and a format of our own: the parts are DeepSpeed's checkpoint state dicts, the one thing both
ZeRO-2 and ZeRO-3 restore exactly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from learner.checkpointing import rank_checkpoint_files
from learner.metrics import Metrics, Reduce

logger = logging.getLogger(__name__)


class SnapshotStore:
    """Holds the learner ranks' snapshots in memory (a Ray actor, ``num_cpus=0``).

    A snapshot of policy ``version`` is complete once all ``num_ranks`` ranks sent their part: ``{path relative to
    the checkpoint dir: a DeepSpeed state dict whose tensors are `HostTensor` s, or a file's bytes}``. The store keeps the newest complete snapshot and the parts of newer ones, and drops
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
        self.parts: dict[int, dict[int, dict[str, Any]]] = {}  # version -> rank -> parts

    def put(self, rank: int, version: int, files: dict[str, Any]) -> int:
        """Store rank ``rank``'s part of the snapshot of ``version``; returns the newest complete version (or -1).

        Raises:
            ValueError: ``rank`` is outside ``[0, num_ranks)``.
        """
        if not 0 <= rank < self.num_ranks:
            raise ValueError(f"snapshot part from rank {rank}; this store holds ranks 0..{self.num_ranks - 1}")
        # arrays Ray hands an actor are read-only views of its object store, pinned while referenced: copied into
        # this process's memory, so snapshots never hold the object store that weight pushes go through
        self.parts.setdefault(version, {})[rank] = _map(files, lambda h: HostTensor(h.array.copy(), h.dtype),
                                                        lambda x: isinstance(x, HostTensor))
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

    def files(self, version: int, names: list[str]) -> dict[str, Any]:
        """The files ``names`` of the snapshot of ``version``, whichever rank wrote them.

        Raises:
            KeyError: no complete snapshot of ``version``, or a name it lacks.
        """
        merged = {n: b for files in self._complete(version).values() for n, b in files.items()}
        return {n: merged[n] for n in names}

    def nbytes(self) -> int:
        """Bytes held, over every snapshot and rank."""
        return sum(nbytes(files) for ranks in self.parts.values() for files in ranks.values())

    def _complete(self, version: int) -> dict[int, dict[str, Any]]:
        ranks = self.parts.get(version, {})
        if len(ranks) != self.num_ranks:
            raise KeyError(f"no complete learner snapshot of version {version} (complete: {self.latest()})")
        return ranks


_SAME_WIDTH_INT = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


@dataclass(frozen=True)
class HostTensor:
    """A tensor copied into host memory as a numpy array (a dtype numpy lacks, such as bfloat16, as the signed
    integer of the same width), so that Ray sends it as an out-of-band buffer (one memory copy, no pickling of the
    data) rather than through torch's pickler, which serialises every storage with ``torch.save``.

    ``array``: the data (``numpy.ndarray``, the tensor's shape); ``dtype``: the torch dtype's name (``"bfloat16"``).
    """

    array: Any
    dtype: str

    @classmethod
    def of(cls, t) -> HostTensor:
        """A copy of tensor ``t`` (any device) that later changes to ``t`` do not reach."""
        import torch

        c = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        name = str(c.dtype).removeprefix("torch.")
        try:
            return cls(c.numpy(), name)
        except TypeError:  # numpy has no such dtype
            return cls(c.view(getattr(torch, _SAME_WIDTH_INT[c.element_size()])).numpy(), name)

    def tensor(self):
        """A new, writable CPU tensor with the data, dtype and shape copied."""
        import numpy as np
        import torch

        t = torch.from_numpy(np.array(self.array))  # a copy: the array may be a read-only view of Ray's store
        dtype = getattr(torch, self.dtype)
        return t if t.dtype == dtype else t.view(dtype)


def nbytes(obj) -> int:
    """Bytes of the tensors, `HostTensor` s and byte strings in ``obj`` (nested dicts, lists and tuples)."""
    if isinstance(obj, (bytes, bytearray)):
        return len(obj)
    if isinstance(obj, HostTensor):
        return obj.array.nbytes
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def _map(obj, leaf: Callable[[Any], Any], is_leaf: Callable[[Any], bool]):
    """``obj`` with ``leaf`` applied to every value ``is_leaf`` picks, through nested dicts (their type kept:
    OrderedDict, defaultdict), lists and tuples; other values kept as they are."""
    if is_leaf(obj):
        return leaf(obj)
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = _map(v, leaf, is_leaf)
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, leaf, is_leaf) for v in obj)
    return obj


def host_copy(obj):
    """``obj`` with every tensor in it copied to a `HostTensor`: a copy the next optimizer step cannot change, which
    Ray sends without pickling the data. Other values are kept as they are (DeepSpeed's state dicts hold numbers,
    strings, shapes and its version beside the tensors)."""
    return _map(obj, HostTensor.of, lambda x: hasattr(x, "detach") and hasattr(x, "numel"))


def to_tensors(obj):
    """The inverse of `host_copy`: every `HostTensor` in ``obj`` back to a (new) torch tensor."""
    return _map(obj, HostTensor.tensor, lambda x: isinstance(x, HostTensor))


class MemoryCheckpointEngine:
    """A DeepSpeed checkpoint engine that keeps what DeepSpeed saves in memory and serves loads from memory.

    ``save(state_dict, path)`` keeps `host_copy` of the state under ``path`` (nothing is written), ``load(path)``
    returns `to_tensors` of the state given for ``path`` in ``loaded`` (DeepSpeed opens a path only if a file exists
    there: the caller puts an empty one), falling back to ``base``; everything else (``makedirs``, ``create``, ``commit``, ...) is ``base``'s.
    Paths are compared normalised (`os.path.normpath`).

    Args:
        base: the engine's own checkpoint engine (``DeepSpeedEngine.checkpoint_engine``).
        loaded: ``{path: state dict}`` to serve loads from.
    """

    def __init__(self, base, loaded: dict[str, object] | None = None) -> None:
        self.base, self.saved = base, {}
        self.loaded = {os.path.normpath(p): v for p, v in (loaded or {}).items()}

    def __getattr__(self, name: str):
        return getattr(self.base, name)

    def save(self, state_dict, path: str) -> None:
        self.saved[os.path.normpath(path)] = host_copy(state_dict)

    def load(self, path: str, map_location=None):
        key = os.path.normpath(path)
        return to_tensors(self.loaded[key]) if key in self.loaded else self.base.load(path, map_location=map_location)


class LearnerSnapshots:
    """The snapshot methods of `learner.worker.LearnerWorker` (a mixin: they use `save_checkpoint` and
    `_load_local` of `learner.checkpointing.LearnerCheckpoints`, ``self.cfg`` and ``self.rank``); every rank
    must call each (DeepSpeed's checkpoint save and load are collective)."""

    _sending: threading.Thread | None = None
    _send_error: str | None = None

    def node_id(self) -> str:
        """The Ray node id of this rank's node (the store goes to another one)."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def snapshot(self, store, version: int, timeout_s: float) -> Metrics:
        """Snapshot this rank's training state as policy ``version`` into ``store`` (a `SnapshotStore` actor handle).

        Waits first for this rank's previous snapshot to arrive (bounded by ``timeout_s``), then runs `save_checkpoint`
        with a `MemoryCheckpointEngine`: DeepSpeed's state dicts are copied in memory (on CPU; nothing is serialised
        or written but the small RNG file), and a thread sends them to the store while the next steps run.

        Returns metrics: ``learner/snapshot_seconds`` (the time the rank was held, max over ranks), of which
        ``learner/snapshot_wait_seconds`` waiting for the previous send, and ``learner/snapshot_bytes`` (this
        snapshot's tensor bytes, summed over ranks).

        Raises:
            RuntimeError: the previous send failed (the store died or refused it); the next call tries again.
        """
        t0 = time.perf_counter()
        self.wait_snapshot_sent(timeout_s)
        waited = time.perf_counter() - t0
        local = tempfile.mkdtemp(prefix=f"relayrl-snapshot-r{self.rank}-")
        try:
            with self._checkpoint_engine(MemoryCheckpointEngine(self.engine.checkpoint_engine)) as mem:
                self.save_checkpoint(local)
            parts = {os.path.relpath(p, local).replace(os.sep, "/"): state for p, state in mem.saved.items()}
            for root, _, names in os.walk(local):  # what was written as files: the RNG state
                for n in names:
                    rel = os.path.relpath(os.path.join(root, n), local).replace(os.sep, "/")
                    if rel not in parts and not n.startswith("zero_to_"):  # not DeepSpeed's recovery scripts
                        with open(os.path.join(root, n), "rb") as f:
                            parts[rel] = f.read()
        finally:
            shutil.rmtree(local, ignore_errors=True)
        self._sending = threading.Thread(target=self._send, args=(store, version, parts, timeout_s), daemon=True,
                                         name=f"snapshot-send-{version}")
        self._sending.start()
        out = Metrics()
        out.put(Reduce.MAX, {"learner/snapshot_seconds": time.perf_counter() - t0,
                             "learner/snapshot_wait_seconds": waited})
        out.put(Reduce.SUM, {"learner/snapshot_bytes": float(nbytes(parts))})
        return out

    @contextlib.contextmanager
    def _checkpoint_engine(self, engine):
        """DeepSpeed's checkpoint engine replaced by ``engine`` inside the block."""
        own = self.engine.checkpoint_engine
        self.engine.checkpoint_engine = engine
        try:
            yield engine
        finally:
            self.engine.checkpoint_engine = own

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
        parts = ray.get(store.files.remote(version, names), timeout=timeout_s)
        local = tempfile.mkdtemp(prefix=f"relayrl-restore-r{self.rank}-")
        loaded = {}
        try:
            for n, part in parts.items():
                path = os.path.join(local, *n.split("/"))
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:  # a state dict: an empty file DeepSpeed finds, its load comes from memory
                    f.write(part if isinstance(part, bytes) else b"")
                if not isinstance(part, bytes):
                    loaded[path] = part
            with self._checkpoint_engine(MemoryCheckpointEngine(self.engine.checkpoint_engine, loaded)):
                self._load_local(local, f"the learner snapshot of version {version}")
        finally:
            shutil.rmtree(local, ignore_errors=True)
        logger.info("learner rank %d restored the snapshot of version %d (%d parts, %.1f MB)", self.rank, version,
                    len(parts), nbytes(parts) / 2**20)
        return True
