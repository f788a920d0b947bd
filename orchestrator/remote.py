"""Bounded waits on Ray work: every remote wait of the orchestrator goes through `wait_all`."""

from __future__ import annotations


def wait_all(refs: list, timeout_s: float, what: str) -> list:
    """Wait until every ObjectRef in ``refs`` is ready and return their values.

    Raises:
        TimeoutError: not all were ready within ``timeout_s`` seconds; names ``what``.
        ray.exceptions.RayError: a task or actor failed (re-raised from `ray.get`).
    """
    import ray

    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if len(ready) < len(refs):
        raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s")
    return ray.get(refs)
