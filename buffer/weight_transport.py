"""Weight push over a collective group: learner rank 0 broadcasts the weight buckets to every rollout
worker (gloo on CPU, NCCL on GPU), instead of passing them through Ray's object store.

The group is learner rank 0 (group rank 0, the source) plus the rollout workers (ranks 1..N), built
with its own TCP store so it is independent of the learner's DeepSpeed process group. Its membership
is fixed, so the orchestrator builds a new one (a new ``name``) whenever rollout workers come, go or
restart. It lives in buffer/ because both ends use it: learner rank 0 sends, rollout workers receive.
A push is versioned and bucketed: a header ``[version, number of buckets]``, the bucket lengths,
then each bucket (`buffer.weight_buckets` format) as a uint8 tensor.
Every collective call is bounded by the group's timeout.

Left out on purpose: broadcasting straight into the GPU engine's parameters (NCCL moves the same
serialised buckets through GPU memory, then they load like an object-store push).
"""

from __future__ import annotations

import datetime


class WeightGroup:
    """One member's end of a weight-broadcast group.

    Args:
        backend: ``"gloo"`` or ``"nccl"`` (then tensors go through the current CUDA device).
        master_addr, master_port: TCP store of the group, hosted by rank 0.
        rank, world_size: this member's rank (0 = learner rank 0, the source) and the group size.
        timeout_s: bound on joining and on each collective call, in seconds.
        name: unique per group generation (prefixes the store keys).

    Raises:
        ValueError: unknown backend.
        RuntimeError / DistStoreError: the other members did not join within ``timeout_s``.
    """

    def __init__(self, backend: str, master_addr: str, master_port: int, rank: int, world_size: int,
                 timeout_s: float, name: str) -> None:
        import torch
        from torch.distributed import PrefixStore, TCPStore

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight transport backend must be 'gloo' or 'nccl', got {backend!r}")
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size, self.name = rank, world_size, name
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self._store = TCPStore(master_addr, master_port, world_size, rank == 0, timeout=timeout)
        prefix = PrefixStore(name, self._store)
        if backend == "gloo":
            from torch._C._distributed_c10d import ProcessGroupGloo

            self.pg = ProcessGroupGloo(prefix, rank, world_size, timeout)
        else:
            from torch._C._distributed_c10d import ProcessGroupNCCL

            opts = ProcessGroupNCCL.Options()
            opts._timeout = timeout
            self.pg = ProcessGroupNCCL(prefix, rank, world_size, opts)

    def _broadcast(self, t):
        from torch._C._distributed_c10d import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = 0
        self.pg.broadcast([t], opts).wait()
        return t

    def send(self, version: int, buckets: list[bytes]) -> int:
        """Broadcast ``buckets`` of policy ``version`` (rank 0 only); returns bytes sent."""
        import torch

        if self.rank != 0:
            raise RuntimeError(f"only rank 0 sends weights; this is rank {self.rank}")
        self._broadcast(torch.tensor([version, len(buckets)], dtype=torch.int64, device=self.device))
        self._broadcast(torch.tensor([len(b) for b in buckets], dtype=torch.int64, device=self.device))
        for b in buckets:
            self._broadcast(torch.frombuffer(bytearray(b), dtype=torch.uint8).to(self.device))
        return sum(len(b) for b in buckets)

    def receive(self) -> tuple[int, list[bytes]]:
        """Receive one push (ranks >= 1); returns ``(version, buckets)``."""
        import torch

        head = self._broadcast(torch.zeros(2, dtype=torch.int64, device=self.device)).tolist()
        version, n = int(head[0]), int(head[1])
        lens = self._broadcast(torch.zeros(n, dtype=torch.int64, device=self.device)).tolist()
        buckets = [self._broadcast(torch.empty(int(k), dtype=torch.uint8, device=self.device)).cpu().numpy().tobytes()
                   for k in lens]
        return version, buckets
