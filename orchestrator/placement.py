"""Placement of learner ranks, rollout workers and reward-model servers: resource bundles reserved as Ray
placement groups.

Each actor kind has its own resource spec in the run config (CPUs, GPUs, custom resources, node
labels), and the orchestrator reserves it here and hands the result down: rollout/ and learner/ never
import this module. The learner ranks share one placement group (``learner.placement_strategy``: PACK keeps them
on as few nodes as possible for fast collectives, SPREAD spreads them); each rollout worker gets a
one-bundle group of its own (``rollout.num_gpus * rollout.tensor_parallel_size`` GPUs: one engine with
all its tensor-parallel ranks), so workers can be added and removed while a run goes on; so does each server
of a ``[[reward_models]]`` pool. Before anything
is reserved, `wait_for_resources` checks that the cluster's totals cover the run (waiting up to
``ray.wait_for_resources_s`` for an autoscaler to add nodes, asking it for the run's bundles). A
reservation that the cluster cannot satisfy fails after ``ray.placement_timeout_s`` with a message
naming the bundle, the labels and what the cluster has, instead of waiting silently.

Left out on purpose: bin-packing the bundles onto the cluster's nodes ahead of time (the placement
groups do that, bounded by ``ray.placement_timeout_s``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from orchestrator.config import RunConfig


def on_driver_node():
    """A scheduling strategy that keeps an actor on the driver's node (the replay buffer, the control
    actor, the model file server): they hold the run's state with the driver, so losing another node never
    takes them along, and Ray would otherwise put these zero-CPU actors on any node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


def bundle(num_cpus: float, num_gpus: float, resources: dict[str, float]) -> dict[str, float]:
    """One actor's Ray resource bundle (zero amounts left out: Ray rejects them)."""
    out = {"CPU": num_cpus, "GPU": num_gpus, **resources}
    return {k: float(v) for k, v in out.items() if v > 0}


def learner_bundle(cfg: RunConfig) -> dict[str, float]:
    """One learner rank's bundle (CPUs, GPUs, custom resources)."""
    lc = cfg.learner
    return bundle(lc.num_cpus, lc.num_gpus, lc.resources)


def rollout_bundle(cfg: RunConfig) -> dict[str, float]:
    """One rollout worker's bundle: ``rollout.num_gpus`` GPUs per tensor-parallel rank, so an engine
    with ``rollout.tensor_parallel_size = T`` ranks gets ``T * num_gpus`` GPUs in one bundle (CPUs and
    custom resources are per worker)."""
    rc = cfg.rollout
    return bundle(rc.num_cpus, rc.num_gpus * rc.tensor_parallel_size, rc.resources)


def reward_model_bundle(rm) -> dict[str, float]:
    """One server's bundle of a ``[[reward_models]]`` pool (`rollout.reward_models`)."""
    return bundle(rm.num_cpus, rm.num_gpus, rm.resources)


def run_bundles(cfg: RunConfig) -> list[dict[str, float]]:
    """Every bundle the run reserves at start: one per learner rank, then one per rollout worker, then one per
    reward-model server."""
    return ([learner_bundle(cfg)] * cfg.learner.num_learners + [rollout_bundle(cfg)] * cfg.rollout.num_workers
            + [reward_model_bundle(r) for r in cfg.reward_models for _ in range(r.num_workers)])


def shortfall(cfg: RunConfig, cluster: dict[str, float]) -> list[str]:
    """What the cluster's totals lack for the run, one phrase per resource ([] when nothing is missing).

    Args:
        cfg: the run config (its learner and rollout resource specs).
        cluster: the cluster's total resources, as `ray.cluster_resources()` returns them.

    Returns:
        e.g. ``["4 GPU (learner: 2 x 1, rollout: 2 x 1) but the Ray cluster has 1"]``, sorted by resource.
    """
    lc, rc = cfg.learner, cfg.rollout
    per_rank, per_worker = learner_bundle(cfg), rollout_bundle(cfg)
    pools = [(r.name, r.num_workers, reward_model_bundle(r)) for r in cfg.reward_models]
    missing = []
    for res in sorted(set(per_rank) | set(per_worker) | {k for _, _, b in pools for k in b}):
        a, b = per_rank.get(res, 0.0), per_worker.get(res, 0.0)
        amount = lc.num_learners * a + rc.num_workers * b + sum(n * p.get(res, 0.0) for _, n, p in pools)
        if amount > cluster.get(res, 0.0) + 1e-9:
            rms = "".join(f", reward model {name}: {n} x {p.get(res, 0.0):g}" for name, n, p in pools
                          if p.get(res, 0.0))
            missing.append(f"{amount:g} {res} (learner: {lc.num_learners} x {a:g}, rollout: {rc.num_workers} x "
                           f"{b:g}{rms}) but the Ray cluster has {cluster.get(res, 0.0):g}")
    return missing


def check_resources(cfg: RunConfig, cluster: dict[str, float]) -> None:
    """Fail fast when the cluster cannot host the run's actors (Ray would wait silently forever).

    Custom resources (``learner.resources``, ``rollout.resources``) count like CPUs and GPUs; node
    labels are checked when the placement groups are reserved (`reserve`).

    Raises:
        RuntimeError: naming each missing resource, how much the config asks for and how much exists.
    """
    missing = shortfall(cfg, cluster)
    if missing:
        raise RuntimeError(f"the run needs {'; '.join(missing)}; lower the learner/rollout resource spec, add nodes "
                           "that have it, or set ray.wait_for_resources_s to wait for an autoscaler to add them")


def wait_for_resources(cfg: RunConfig, timeout_s: float, poll_s: float = 2.0, report_every_s: float = 30.0) -> None:
    """Wait until the Ray cluster's totals cover the run, asking the autoscaler for the run's bundles.

    With ``timeout_s = 0`` this is `check_resources` on the current totals (fail fast). Otherwise the
    run's bundles are requested from the autoscaler (`ray.autoscaler.sdk.request_resources`; a no-op
    hint on a cluster without one), the totals are polled every ``poll_s`` seconds, what is still
    missing is logged every ``report_every_s`` seconds, and the request is withdrawn again when the
    wait ends (the placement groups reserved next hold the nodes).

    Args:
        cfg: the run config.
        timeout_s: max seconds to wait (``ray.wait_for_resources_s``); 0: check once.
        poll_s: seconds between looks at `ray.cluster_resources()`.
        report_every_s: seconds between log lines naming what is missing.

    Raises:
        RuntimeError: still missing after ``timeout_s``; one line naming each missing resource, the
            amount asked for and the amount the cluster has.
    """
    import ray

    missing = shortfall(cfg, ray.cluster_resources())
    if not missing:
        return
    if timeout_s <= 0:
        check_resources(cfg, ray.cluster_resources())
        return
    from ray.autoscaler.sdk import request_resources

    lc, rc = cfg.learner, cfg.rollout
    labels = ([lc.node_labels] * lc.num_learners + [rc.node_labels] * rc.num_workers
              + [r.node_labels for r in cfg.reward_models for _ in range(r.num_workers)])
    request_resources(bundles=run_bundles(cfg), bundle_label_selectors=labels if any(labels) else None)
    t0 = time.monotonic()
    next_report = t0
    try:
        while missing:
            now = time.monotonic()
            if now - t0 >= timeout_s:
                raise RuntimeError(
                    f"the run needs {'; '.join(missing)}, still missing after waiting {timeout_s:g} s "
                    "(ray.wait_for_resources_s); lower the learner/rollout resource spec, check the autoscaler's "
                    "node types and max workers (`ray status`), or wait longer")
            if now >= next_report:
                logger.info("waiting up to %.0f s more for the Ray cluster to provide %s", timeout_s - (now - t0),
                            "; ".join(missing))
                next_report = now + report_every_s
            time.sleep(max(0.0, min(poll_s, timeout_s - (now - t0))))
            missing = shortfall(cfg, ray.cluster_resources())
        logger.info("the Ray cluster now provides the run's resources after %.0f s: %s", time.monotonic() - t0,
                    ray.cluster_resources())
    finally:
        request_resources(bundles=[])  # withdraw the request; the placement groups hold the nodes from here


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

    def __init__(self, bundle_: dict[str, float], labels: dict[str, str], timeout_s: float,
                 what: str = "rollout worker") -> None:
        self.bundle, self.labels, self.timeout_s, self.what = bundle_, labels, timeout_s, what
        self.pgs: dict = {}  # slot -> its placement group

    def strategy(self, slot: int):
        """Scheduling strategy of the actor of ``slot``."""
        if slot not in self.pgs:
            self.pgs[slot] = reserve([self.bundle], "PACK", self.labels, self.timeout_s, f"{self.what} {slot}")
        return scheduling(self.pgs[slot], 0)

    def release(self, slot: int) -> None:
        """Free the placement group of ``slot`` (if any)."""
        if slot in self.pgs:
            release(self.pgs.pop(slot))
