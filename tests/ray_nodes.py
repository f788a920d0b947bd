"""Helpers for tests that start Ray nodes of their own with `ray start` (a cluster on loopback)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    """`ray start` flags giving every agent port of one node a free port (the test session's own Ray
    instance holds the defaults)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def stop_node(proc: subprocess.Popen, timeout_s: float = 90) -> None:
    """Stop a `ray start --block` started with ``start_new_session=True``: SIGTERM to its process group
    (it stops the node it started), SIGKILL after ``timeout_s`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
