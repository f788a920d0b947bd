"""Free TCP ports on loopback for the servers and nodes that tests start (Ray nodes, moto, process groups)."""

from __future__ import annotations

import socket

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now and that no earlier call of this process
    returned. A port picked by binding port 0 is free only until it is released, and the kernel may pick it
    again for the next bind: a node's ports taken one call at a time once came out equal (Ray refused to
    start: "dashboard_agent_grpc is trying to use a port number 55817 that is used by other components")."""
    held = []
    try:
        while True:
            s = socket.socket()
            held.append(s)  # held open while picking, so the kernel cannot return it again meanwhile
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                _HANDED_OUT.add(port)
                return port
    finally:
        for s in held:
            s.close()
