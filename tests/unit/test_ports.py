"""The port helper of the tests that start their own servers and Ray nodes: every port it hands out is distinct."""

from __future__ import annotations

import socket

from ports import free_port


def test_free_port_never_hands_out_the_same_port_twice():
    # 3000 draws from ~28000 ephemeral ports: one-at-a-time picks repeat with near certainty (birthday bound).
    ports = [free_port() for _ in range(3000)]
    assert len(set(ports)) == len(ports)


def test_a_handed_out_port_can_be_listened_on():
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
