"""Weight push over a collective group: learner rank 0 broadcasts the weight buckets to every rollout
worker (gloo on CPU, NCCL on GPU), instead of passing them through Ray's object store.

The group is learner rank 0 (group rank 0, the source) plus the rollout workers (ranks 1..N), built
with its own TCP store so it is independent of the learner's DeepSpeed process group; the store listens on a
port the kernel picked and held from then on (`host_store`), never one found free and released. Its membership
is fixed, so the orchestrator builds a new one (a new ``name``) whenever rollout workers come, go or
restart. It lives in buffer/ because both ends use it: learner rank 0 sends, rollout workers receive.
A push is versioned and bucketed: a header ``[version, number of buckets]``, the bucket lengths,
then each bucket (`base.weight_buckets` format) as a uint8 tensor.

A push fails cleanly: the whole send (or receive) is bounded by one timeout, shared by its broadcasts;
a broadcast that times out or loses a peer raises in the caller, and the group is then broken for good
(later calls raise at once) so the orchestrator builds a new one. NCCL's default on a timeout is to
tear the process down (its watchdog aborts it): the NCCL weight group is built with the settings in
`NCCL_WEIGHT_GROUP_ENV` (errors raise in ``wait``, the communicator is aborted, the process lives). The
learner's own DeepSpeed group keeps torch's defaults: those settings are read per process group, when
it is built, and restored right after.

Left out on purpose: broadcasting straight into the GPU engine's parameters (NCCL moves the same
serialised buckets through GPU memory, then they load like an object-store push).
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

NCCL_WEIGHT_GROUP_ENV = {
    # ErrorHandlingMode CleanUpOnly: on a timeout or error, abort the communicator, keep the process
    # (torch's default, 3 = SkipCleanUp, and 1 = TearDown take the whole process down)
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    # Work.wait() blocks until the broadcast finished or timed out, and raises in the caller on a timeout
    "TORCH_NCCL_BLOCKING_WAIT": "1",
    # the heartbeat monitor kills the process when the watchdog is stuck (e.g. in an abort): not for this group
    "TORCH_NCCL_ENABLE_MONITORING": "0",
}
"""Environment ProcessGroupNCCL reads when the weight group is built (set only while it is built)."""


def host_store(host: str, timeout_s: float):
    """A TCP store server (`torch.distributed.TCPStore`, the master of a group's rendezvous) on a port the kernel
    picks: it binds port 0 and listens (on every interface) before anyone learns the port, and holds it until the
    store is dropped, so nothing can take the port between its pick and the group's use of it (a port found free
    by binding and releasing a socket can: the kernel may hand it to the next bind). Read the port from ``.port``.

    Args:
        host: this node's address (the store's own client connects to it).
        timeout_s: the store's default bound on a wait, in seconds (a group sets its own when it uses the store).
    """
    from torch.distributed import TCPStore

    return TCPStore(host, 0, None, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def group_store(addr: str, port: int, is_master: bool, timeout_s: float, hosted=None):
    """The TCP store of a group at ``addr:port``: ``hosted`` (a `host_store` this process made for the group) when
    it listens on ``port``, else a new server on ``port`` (``is_master``: a port the caller chose) or a client of it.

    Raises:
        RuntimeError / DistNetworkError: a client found no server at ``addr:port`` within ``timeout_s``; a server
            could not bind ``port`` (in use).
    """
    from torch.distributed import TCPStore

    timeout = datetime.timedelta(seconds=timeout_s)
    if hosted is not None and hosted.port == port:
        hosted.set_timeout(timeout)
        return hosted
    return TCPStore(addr, port, None, is_master, timeout=timeout, wait_for_workers=False)


@contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set the environment variables in ``values`` inside the block; restore the previous ones after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class WeightGroup:
    """One member's end of a weight-broadcast group.

    Args:
        backend: ``"gloo"`` or ``"nccl"`` (then tensors go through the current CUDA device).
        master_addr, master_port: TCP store of the group, hosted by rank 0.
        rank, world_size: this member's rank (0 = learner rank 0, the source) and the group size.
        timeout_s: bound on joining and on each whole send or receive, in seconds.
        name: unique per group generation (prefixes the store keys).
        store: rank 0: the store it hosts for this group (`host_store`, listening on ``master_port``); without
            it rank 0 starts a store on ``master_port``.

    Raises:
        ValueError: unknown backend.
        RuntimeError / DistStoreError: the other members did not join within ``timeout_s``.
    """

    def __init__(self, backend: str, master_addr: str, master_port: int, rank: int, world_size: int,
                 timeout_s: float, name: str, store=None) -> None:
        import torch
        from torch.distributed import PrefixStore

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight transport backend must be 'gloo' or 'nccl', got {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.name, self.timeout_s = rank, world_size, name, timeout_s
        self.broken: str | None = None  # why a send/receive failed; the group is not used again
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._store = group_store(master_addr, master_port, rank == 0, timeout_s, store)
        prefix = PrefixStore(name, self._store)
        if backend == "gloo":
            from torch._C._distributed_c10d import ProcessGroupGloo

            self.pg = ProcessGroupGloo(prefix, rank, world_size, timeout)
        else:
            from torch._C._distributed_c10d import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts._timeout = timeout
            with scoped_env(NCCL_WEIGHT_GROUP_ENV):
                self.pg = ProcessGroupNCCL(prefix, rank, world_size, opts)

    def _broadcast(self, t, deadline: float):
        from torch._C._distributed_c10d import BroadcastOptions

        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"weight group {self.name}: the push ran past its deadline")
        opts = BroadcastOptions()
        opts.rootRank = 0
        opts.timeout = datetime.timedelta(seconds=left)
        self.pg.broadcast([t], opts).wait(datetime.timedelta(seconds=left))
        return t

    @contextmanager
    def _guard(self, timeout_s: float) -> Iterator[float]:
        """Yields the deadline of one send/receive; a failure inside breaks the group for good."""
        if self.broken is not None:
            raise RuntimeError(f"weight group {self.name} is broken ({self.broken}); build a new one")
        try:
            yield time.monotonic() + timeout_s
        except (RuntimeError, TimeoutError) as e:  # torch's DistBackendError / DistNetworkError are RuntimeErrors
            self.broken = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self._abort()
            raise

    def _abort(self) -> None:
        """Abort the broken group's communicator (NCCL; gloo's ops already ended with their timeout)."""
        abort = getattr(self.pg, "abort", None)
        if abort is not None and self.device.type == "cuda":
            abort()

    def send(self, version: int, buckets: list[bytes], timeout_s: float | None = None) -> int:
        """Broadcast ``buckets`` of policy ``version`` (rank 0 only); returns bytes sent.

        ``timeout_s`` bounds the whole send (default: the group's ``timeout_s``).

        Raises:
            TimeoutError / RuntimeError: not done within the timeout, a peer was lost, or the group is
                broken by an earlier failure (then it stays broken: build a new group).
        """
        import torch

        if self.rank != 0:
            raise RuntimeError(f"only rank 0 sends weights; this is rank {self.rank}")
        with self._guard(self.timeout_s if timeout_s is None else timeout_s) as deadline:
            self._broadcast(torch.tensor([version, len(buckets)], dtype=torch.int64, device=self.device), deadline)
            self._broadcast(torch.tensor([len(b) for b in buckets], dtype=torch.int64, device=self.device), deadline)
            for b in buckets:
                self._broadcast(torch.frombuffer(bytearray(b), dtype=torch.uint8).to(self.device), deadline)
        return sum(len(b) for b in buckets)

    def receive(self) -> tuple[int, list[bytes]]:
        """Receive one push (ranks >= 1) within the group's ``timeout_s``; returns ``(version, buckets)``.

        Raises:
            TimeoutError / RuntimeError: as `send`.
        """
        import torch

        with self._guard(self.timeout_s) as deadline:
            head = self._broadcast(torch.zeros(2, dtype=torch.int64, device=self.device), deadline).tolist()
            version, n = int(head[0]), int(head[1])
            lens = self._broadcast(torch.zeros(n, dtype=torch.int64, device=self.device), deadline).tolist()
            buckets = [self._broadcast(torch.empty(int(k), dtype=torch.uint8, device=self.device),
                                       deadline).cpu().numpy().tobytes() for k in lens]
        return version, buckets
