"""`LearnerWeightPush`: the weight-push methods of `learner.worker.LearnerWorker` (a mixin: they use its DeepSpeed
engine ``self.engine``, ``self.cfg``, ``self.rank`` and ``self._group_store``), thin wrappers over the plain
functions of `learner.weight_export`: export the weights as safetensors buckets, join a weight-broadcast group,
broadcast over it. The actor keeps the group it joined (``self.weight_group``) and drops one that failed."""

from __future__ import annotations

import time

from learner import weight_export


class LearnerWeightPush:
    """Weight export and broadcast of one learner rank; under ZeRO-3 every rank must call each method."""

    def _gathered_named_params(self, adapters_only: bool = False):
        """Full CPU tensors by name on rank 0; ZeRO-3 ranks > 0 join each gather and get None, ZeRO-1/2 ranks > 0
        nothing (`learner.weight_export.gathered_named_params`). Under ZeRO-3 every rank must iterate it."""
        return weight_export.gathered_named_params(self.engine.module, self.rank, self.cfg.zero_stage, adapters_only)

    def join_weight_group(self, backend: str, addr: str, port: int, world_size: int, timeout_s: float,
                          name: str) -> None:
        """Rank 0 joins (as source, group rank 0) the weight-broadcast group ``name``; other ranks do nothing."""
        if self.rank == 0:
            from base.weight_group import WeightGroup

            self.weight_group = None  # the previous generation's group goes first
            self.weight_group = WeightGroup(backend, addr, port, 0, world_size, timeout_s, name,
                                            store=self._group_store(addr, port, timeout_s))

    def broadcast_weights(self, version: int, dtype: str, bucket_bytes: int) -> dict:
        """Export the weights (every rank: ZeRO-3 gathers) and broadcast them from rank 0 to the rollout workers
        of the weight group (`learner.weight_export.broadcast`); returns export and broadcast metrics (rank 0).

        Export and broadcast together take at most the group's timeout (s). A broadcast that fails discards the
        group (it is never used again; the orchestrator builds a new one) and raises; this process and its
        DeepSpeed group are unaffected.

        Raises:
            RuntimeError: rank 0 has no weight group (none joined, or the last one failed).
            TimeoutError / RuntimeError: the broadcast timed out or lost a rollout worker.
        """
        t0 = time.monotonic()
        buckets, m = self.export_weights(dtype, bucket_bytes)
        if self.rank != 0:
            return {}
        try:
            return weight_export.broadcast(getattr(self, "weight_group", None), version, buckets, m, t0)
        except (RuntimeError, TimeoutError):
            self.weight_group = None
            raise

    def export_weights(self, dtype: str, bucket_bytes: int) -> tuple[list[bytes] | None, dict]:
        """Full weights (with LoRA: the adapter tensors only) as safetensors buckets in the rollout ``dtype``
        (rank 0; other ranks return None) and export metrics (`learner.weight_export.export_buckets`); every
        rank must call it under ZeRO-3."""
        named = self._gathered_named_params(adapters_only=self.cfg.lora is not None)
        return weight_export.export_buckets(named, self.rank, dtype, bucket_bytes)
