"""Helpers for tests that start Ray nodes of their own with `ray start` (a cluster on loopback)."""

from __future__ import annotations

import os
import signal
import subprocess

from ports import free_port


# for the environment of `ray start`: on SIGTERM a node first drains (waits for its leases to be returned, up to
# RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, 30 s by default) before stopping its processes; a test's node has no
# traffic to hand over, and with the default each stop took 34.5 s instead of 3.8 s on this 2-core machine
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}


def agent_ports() -> list[str]:
    """`ray start` flags giving every agent port of one node a free port (the test session's own Ray
    instance holds the defaults)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def stop_node(proc: subprocess.Popen, timeout_s: float = 90) -> None:
    """Stop a `ray start --block` started with ``start_new_session=True``: SIGTERM to its process group
    (it stops the node it started), SIGKILL after ``timeout_s`` seconds."""
    stop_nodes([proc], timeout_s)


def stop_nodes(procs: list[subprocess.Popen], timeout_s: float = 90) -> None:
    """`stop_node` for several nodes at once: SIGTERM to every process group first, then wait for each (a
    node takes seconds to stop its processes; one after the other, those seconds add up), SIGKILL to any
    group still running ``timeout_s`` seconds after the SIGTERMs."""
    import time

    alive = [p for p in procs if p.poll() is None]
    for proc in alive:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for proc in alive:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def kill_mount_namespace(pid: int) -> int:
    """SIGKILL every process in the mount namespace of ``pid`` (a node started under ``unshare -m``), at once:
    the node and every process on it, whatever its process group (Ray's workers need not share the
    raylet's, and a worker whose raylet died goes on serving direct actor calls until it notices).
    Returns how many processes were killed.

    Raises:
        FileNotFoundError: ``pid`` is not running.
        ValueError: ``pid`` shares this process's mount namespace (it would kill this machine's processes).
    """
    ns = os.readlink(f"/proc/{pid}/ns/mnt")
    if ns == os.readlink("/proc/self/ns/mnt"):
        raise ValueError(f"process {pid} shares this process's mount namespace; refusing to kill it all")
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{entry}/ns/mnt") == ns:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited meanwhile
    return killed
