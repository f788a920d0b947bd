"""Placement of learner ranks and rollout workers: resource bundles reserved as Ray placement groups.

Each actor kind has its own resource spec in the run config (CPUs, GPUs, custom resources, node
labels), and the orchestrator reserves it here and hands the result down: rollout/ and learner/ never
import this module. The learner ranks share one placement group (``learner.placement_strategy``: PACK keeps them
on as few nodes as possible for fast collectives, SPREAD spreads them); each rollout worker gets a
one-bundle group of its own, so workers can be added and removed while a run goes on. A reservation
that the cluster cannot satisfy fails after ``ray.placement_timeout_s`` with a message naming the
bundle, the labels and what the cluster has, instead of waiting silently.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from orchestrator.config import RunConfig


def bundle(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """One actor's Ray resource bundle (zero amounts left out: Ray rejects them)."""
    out = {"CPU": num_cpus, "GPU": num_gpus, **resources}
    return {k: float(v) for k, v in out.items() if v > 0}


def reserve(bundles: list[dict[str, float]], strategy: str, labels: dict[str, str], timeout_s: float, what: str):
    """Create a placement group and wait until it is placed.

    Args:
        bundles: one resource dict per actor.
        strategy: Ray strategy (PACK, SPREAD, STRICT_PACK, STRICT_SPREAD).
        labels: node labels every bundle's node must carry (Ray label selector); {} for any node.
        timeout_s: seconds to wait for the reservation.
        what: the actors, for the error message.

    Returns:
        The ready `PlacementGroup`.

    Raises:
        RuntimeError: not placed within ``timeout_s``; names the bundles, labels, strategy and the
            cluster's total resources and node labels (the group is removed again).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group(bundles, strategy=strategy, bundle_label_selector=[labels] * len(bundles) if labels else None)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if ready:
        return pg
    remove_placement_group(pg)
    nodes = [{"resources": n.get("Resources", {}), "labels": {k: v for k, v in n.get("Labels", {}).items()
                                                              if not k.startswith("ray.io/node")}}
             for n in ray.nodes() if n.get("Alive")]
    raise RuntimeError(
        f"the Ray cluster cannot place {what}: {len(bundles)} bundle(s) of {bundles[0]} with strategy {strategy}"
        f"{f' on nodes labelled {labels}' if labels else ''} were not placed within {timeout_s:.0f} s. "
        f"Cluster totals: {ray.cluster_resources()}; alive nodes: {nodes}. Lower the resource spec, fix the "
        "labels, or add nodes")


def scheduling(pg, index: int):
    """Scheduling strategy that puts an actor into bundle ``index`` of ``pg``."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def release(pg) -> None:
    """Remove a placement group (its actors must be dead or about to be killed)."""
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception as e:  # noqa: BLE001 - already removed or the cluster is going away
        logger.debug("placement group removal: %s", e)


class SlotPlacement:
    """One single-bundle placement group per rollout worker slot, reserved on first use.

    What `rollout.group.RolloutGroup` is handed: ``strategy(slot)`` reserves (bounded by ``timeout_s``)
    and returns the slot's scheduling strategy; ``release(slot)`` frees the group.

    Raises:
        RuntimeError: from `strategy`, the bundle was not placed in time (see `reserve`).
    """

    def __init__(self, bundle_: dict[str, float], labels: dict[str, str], timeout_s: float) -> None:
        self.bundle, self.labels, self.timeout_s = bundle_, labels, timeout_s
        self.pgs: dict = {}  # slot -> its placement group

    def strategy(self, slot: int):
        """Scheduling strategy of the actor of ``slot``."""
        if slot not in self.pgs:
            self.pgs[slot] = reserve([self.bundle], "PACK", self.labels, self.timeout_s, f"rollout worker {slot}")
        return scheduling(self.pgs[slot], 0)

    def release(self, slot: int) -> None:
        """Free the placement group of ``slot`` (if any)."""
        if slot in self.pgs:
            release(self.pgs.pop(slot))
def check_resources(cfg: RunConfig, cluster: dict[str, float]) -> None:
    """Fail fast when the cluster cannot host the run's actors (Ray would wait silently forever).

    Custom resources (``learner.resources``, ``rollout.resources``) count like CPUs and GPUs; node
    labels are checked when the placement groups are reserved (`orchestrator.placement`).

    Raises:
        RuntimeError: naming the resource, how much the config asks for and how much exists.
    """
    from orchestrator.placement import bundle

    lc, rc = cfg.learner, cfg.rollout
    per_rank, per_worker = bundle(lc.num_cpus, lc.num_gpus, lc.resources), bundle(rc.num_cpus, rc.num_gpus, rc.resources)
    for res in sorted(set(per_rank) | set(per_worker)):
        a, b = per_rank.get(res, 0.0), per_worker.get(res, 0.0)
        amount = lc.num_learners * a + rc.num_workers * b
        if amount > cluster.get(res, 0.0) + 1e-9:
            raise RuntimeError(
                f"the run needs {amount:g} {res} (learner: {lc.num_learners} x {a:g}, rollout: {rc.num_workers} x "
                f"{b:g}) but the Ray cluster has {cluster.get(res, 0.0):g}; lower the learner/rollout resource "
                "spec or add nodes that have it"
            )


