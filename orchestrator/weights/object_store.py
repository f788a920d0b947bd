"""``weights.type = "object_store"``: learner rank 0 exports the buckets once into Ray's object store;
every worker fetches the same buckets while it keeps generating. Works across nodes with no extra
ports or libraries; every worker pulls its own copy through the object store."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from orchestrator.weights.base import WeightsConfigBase, WeightTransport


class ObjectStoreWeights(WeightsConfigBase):
    """Weights through Ray's object store."""

    type: Literal["object_store"] = Field("object_store", description="buckets through Ray's object store")


class ObjectStoreTransport(WeightTransport):
    """Export once to Ray's object store; every worker fetches the same buckets."""

    type = "object_store"
    config = ObjectStoreWeights

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_export: tuple[int, Any] | None = None  # (version, buckets ref) of the newest export

    def export(self, version: int) -> tuple[Any, Any]:
        """Export ``version`` once (rank 0's buckets into the object store); returns ``(buckets_ref,
        metrics_ref)``. The newest export is kept for `send_to`."""
        buckets_ref, metrics_ref = self.learner.export_weights_remote(self.dtype, self.cfg.bucket_bytes)
        self.last_export = (version, buckets_ref)
        return buckets_ref, metrics_ref

    def push(self, version: int) -> tuple[dict[int, Any], dict[str, float]]:
        import ray

        buckets_ref, metrics_ref = self.export(version)
        refs = {slot: self.rollout.receive_weights_remote(slot, version, buckets_ref) for slot, _ in self.members}
        return refs, ray.get(metrics_ref, timeout=self.cfg.push_timeout_s)

    def send_to(self, slot: int, version: int) -> Any:
        """Send ``version`` to worker ``slot`` alone (a new or recovered worker), exporting first unless the
        newest export is that version or later; returns its receipt ObjectRef."""
        if self.last_export is None or self.last_export[0] < version:
            self.export(version)
        return self.rollout.receive_weights_remote(slot, *self.last_export)
