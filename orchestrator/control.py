"""Talking to a running job: a small named Ray actor per run (`RunControl`) and `relayrl scale`.

The orchestrator creates ``RunControl`` under the run dir's name in the ``relayrl`` namespace and
polls it about once a second; ``relayrl scale RUN --rollout-workers N`` (from any driver connected
to the same cluster; RUN is the run's name, dir or storage URI) sets the desired number of rollout
workers and prints what the run reports.

Automatic scaling (`orchestrator.scaling.Scaler.autoscale`) asks through the same actor.

Left out on purpose: scaling the learner.
"""

from __future__ import annotations

from base import storage

NAMESPACE = "relayrl"


class RunControl:
    """Desired state set from outside, and the status the run reports (plain values only)."""

    def __init__(self, num_rollout_workers: int) -> None:
        self.desired_rollout_workers = num_rollout_workers
        self.status_: dict = {}

    def request_scale(self, num_rollout_workers: int) -> int:
        """Ask for ``num_rollout_workers`` rollout workers; returns the number asked for.

        Raises:
            ValueError: fewer than 1.
        """
        if num_rollout_workers < 1:
            raise ValueError(f"rollout workers must be >= 1, got {num_rollout_workers}")
        self.desired_rollout_workers = int(num_rollout_workers)
        return self.desired_rollout_workers

    def desired(self) -> int:
        return self.desired_rollout_workers

    def report(self, status: dict) -> None:
        self.status_ = dict(status)

    def status(self) -> dict:
        return {"desired_rollout_workers": self.desired_rollout_workers, **self.status_}


def start_control(run_name: str, num_rollout_workers: int):
    """Create the run's named control actor (no CPU reserved); returns its handle."""
    import ray

    from orchestrator.placement import on_driver_node

    return ray.remote(RunControl).options(name=run_name, namespace=NAMESPACE, num_cpus=0, get_if_exists=True,
                                          scheduling_strategy=on_driver_node()).remote(num_rollout_workers)


def scale(run: str, num_rollout_workers: int, address: str | None, timeout_s: float = 30.0) -> dict:
    """Set a running job's rollout worker count; returns the run's status.

    The job is found by its control actor, named as the run dir; so ``run`` may be the run's name, its
    local dir or its storage URI (``s3://bucket/runs/<name>-<timestamp>``), and only the cluster, never
    the storage, needs to be reachable from here.

    Args:
        run: run name, dir or URI (``<output_dir>/<name>-<timestamp>``).
        address: Ray cluster address (default: RAY_ADDRESS, else ``auto``).
        timeout_s: seconds to wait for the control actor's answers.

    Raises:
        ValueError: no running job of that name on the cluster (when ``run`` is a dir or URI: whether
            there is no run there, or it has finished), or a bad count.
        ConnectionError: no Ray cluster to connect to.
    """
    import os

    import ray

    name = storage.basename(run)
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace=NAMESPACE,
                 log_to_driver=False)
    try:
        ctl = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise ValueError(_not_running(run, name)) from None
    ray.get(ctl.request_scale.remote(num_rollout_workers), timeout=timeout_s)
    return ray.get(ctl.status.remote(), timeout=timeout_s)


def _not_running(run: str, name: str) -> str:
    """Why ``run`` has no control actor, in one line: for a dir or URI, what its storage holds."""
    hint = "pass the run dir or URI printed when the run started"
    if "/" in run:  # a dir or URI: say what is there
        try:
            if storage.exists(storage.join(run, "summary.json")):
                return f"the run at {run!r} has finished (it has a summary.json): nothing to scale"
            if not storage.exists(storage.join(run, "config.json")):
                return f"no relayrl run at {run!r} (no config.json there): {hint}"
        except Exception:  # noqa: BLE001 - storage not readable from here (each client its own errors): the
            pass  # cluster's answer says enough
    return (f"no running relayrl job named {name!r} on this Ray cluster: {hint}, and --address of the "
            "cluster it runs on")
