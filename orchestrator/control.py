"""Talking to a running job: a small named Ray actor per run (`RunControl`) and `relayrl scale`.

The orchestrator creates ``RunControl`` under the run dir's name in the ``relayrl`` namespace and
polls it about once a second; ``relayrl scale RUN --rollout-workers N`` (from any driver connected
to the same cluster) sets the desired number of rollout workers and prints what the run reports.

Automatic scaling (`orchestrator.scaling.Scaler.autoscale`) asks through the same actor.

Left out on purpose: scaling the learner.
"""

from __future__ import annotations

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

    return ray.remote(RunControl).options(name=run_name, namespace=NAMESPACE, num_cpus=0,
                                          get_if_exists=True).remote(num_rollout_workers)


def scale(run: str, num_rollout_workers: int, address: str | None, timeout_s: float = 30.0) -> dict:
    """Set a running job's rollout worker count; returns the run's status.

    Args:
        run: run dir name or path (``runs/<name>-<timestamp>``).
        address: Ray cluster address (default: RAY_ADDRESS, else ``auto``).

    Raises:
        ValueError: no running job of that name on the cluster, or a bad count.
        ConnectionError: no Ray cluster to connect to.
    """
    import os
    from pathlib import Path

    import ray

    name = Path(run).name
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace=NAMESPACE,
                 log_to_driver=False)
    try:
        ctl = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise ValueError(f"no running relayrl job named {name!r} on this Ray cluster "
                         "(the name is the run dir's, printed when the run starts)") from None
    ray.get(ctl.request_scale.remote(num_rollout_workers), timeout=timeout_s)
    return ray.get(ctl.status.remote(), timeout=timeout_s)
