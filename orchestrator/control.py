"""Talking to a running job: a small named Ray actor per run (`RunControl`) and `relayrl scale`.

The orchestrator creates ``RunControl`` under the run dir's name in the ``relayrl`` namespace and
polls it about once a second; ``relayrl scale RUN --rollout-workers N`` (from any driver connected
to the same cluster; RUN is the run's name, dir or storage URI) sets the desired number of rollout
workers, ``--reward-model NAME=N`` that of a ``[[reward_models]]`` pool's servers, and prints what the
run reports.

Automatic scaling (`orchestrator.scaling.Scaler.autoscale`) asks through the same actor.

Left out on purpose: scaling the learner.
"""

from __future__ import annotations

from base import storage

NAMESPACE = "relayrl"


class RunControl:
    """Desired state set from outside, and the status the run reports (plain values only)."""

    def __init__(self, num_rollout_workers: int, reward_model_workers: dict[str, int] | None = None) -> None:
        self.desired_rollout_workers = num_rollout_workers
        self.desired_reward_model_workers = dict(reward_model_workers or {})
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

    def request_reward_model_scale(self, name: str, num_workers: int) -> int:
        """Ask for ``num_workers`` servers in reward-model pool ``name``; returns the number asked for.

        Raises:
            ValueError: the run has no pool ``name`` (the message names those it has), or fewer than 1.
        """
        if name not in self.desired_reward_model_workers:
            raise ValueError(f"the run has no reward-model pool {name!r} (its [[reward_models]]: "
                             f"{sorted(self.desired_reward_model_workers) or 'none'}); pass one of those names")
        if num_workers < 1:
            raise ValueError(f"reward model {name!r}: workers must be >= 1, got {num_workers}")
        self.desired_reward_model_workers[name] = int(num_workers)
        return self.desired_reward_model_workers[name]

    def desired(self) -> int:
        return self.desired_rollout_workers

    def desired_reward_models(self) -> dict[str, int]:
        """Pool name -> servers wanted."""
        return dict(self.desired_reward_model_workers)

    def report(self, status: dict) -> None:
        self.status_ = dict(status)

    def status(self) -> dict:
        return {"desired_rollout_workers": self.desired_rollout_workers,
                **({"desired_reward_model_workers": dict(self.desired_reward_model_workers)}
                   if self.desired_reward_model_workers else {}), **self.status_}


def start_control(run_name: str, num_rollout_workers: int, reward_model_workers: dict[str, int] | None = None):
    """Create the run's named control actor (no CPU reserved); returns its handle. ``reward_model_workers``: the
    run's reward-model pools and their servers at start (pool name -> count)."""
    import ray

    from orchestrator.placement import on_driver_node

    return ray.remote(RunControl).options(name=run_name, namespace=NAMESPACE, num_cpus=0, get_if_exists=True,
                                          scheduling_strategy=on_driver_node()).remote(num_rollout_workers,
                                                                                        reward_model_workers)


def scale(run: str, num_rollout_workers: int | None, address: str | None, timeout_s: float = 30.0,
          reward_models: dict[str, int] | None = None) -> dict:
    """Set a running job's rollout worker count and/or its reward-model pools' server counts; returns the run's
    status.

    The job is found by its control actor, named as the run dir; so ``run`` may be the run's name, its
    local dir or its storage URI (``s3://bucket/runs/<name>-<timestamp>``), and only the cluster, never
    the storage, needs to be reachable from here.

    Args:
        run: run name, dir or URI (``<output_dir>/<name>-<timestamp>``).
        num_rollout_workers: rollout workers wanted (None: unchanged).
        address: Ray cluster address (default: RAY_ADDRESS, else ``auto``).
        timeout_s: seconds to wait for the control actor's answers.
        reward_models: pool name -> servers wanted (`RunControl.request_reward_model_scale`).

    Raises:
        ValueError: no running job of that name on the cluster (when ``run`` is a dir or URI: whether
            there is no run there, or it has finished), a pool it does not have, a bad count, or nothing to change.
        ConnectionError: no Ray cluster to connect to.
    """
    import os

    import ray

    if num_rollout_workers is None and not reward_models:
        raise ValueError("nothing to scale: give --rollout-workers N and/or --reward-model NAME=N")

    name = storage.basename(run)
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "auto", namespace=NAMESPACE,
                 log_to_driver=False)
    try:
        ctl = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        raise ValueError(_not_running(run, name)) from None
    if num_rollout_workers is not None:
        ray.get(ctl.request_scale.remote(num_rollout_workers), timeout=timeout_s)
    for name, n in (reward_models or {}).items():
        ray.get(ctl.request_reward_model_scale.remote(name, n), timeout=timeout_s)
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
