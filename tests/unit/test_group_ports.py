"""The ports of the groups learner rank 0 hosts (DeepSpeed's rendezvous, every weight group): the port it hands
out is held by the group's store from the moment it is picked, so no other process can take it before the group
forms (a port found free by binding and releasing a socket can be taken in between)."""

from __future__ import annotations

import errno
import gc
import socket
import threading

from base.weight_group import WeightGroup, host_store
from learner.config import LearnerConfig
from learner.worker import LearnerWorker


def _rank0(model_dir) -> LearnerWorker:
    """A real learner rank 0 before its setup (no model loaded, no process group yet)."""
    return LearnerWorker(LearnerConfig(), str(model_dir), 0, 1, 8, 16, 1.0, 0)


def _taken(port: int) -> bool:
    """Whether another process's bind of ``port`` (any address, as a server would) is refused."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError as e:
            assert e.errno == errno.EADDRINUSE, e
            return True
    return False


def test_the_port_rank_0_hands_out_is_held_until_the_weight_group_uses_it(tmp_path):
    rank0 = _rank0(tmp_path)
    addr, port = rank0.master_address()
    assert _taken(port)  # between the pick and the group's use, nothing else can bind it
    out = {}

    def worker_end() -> None:  # a rollout worker joins by address and port alone, as on another node
        g = WeightGroup("gloo", addr, port, 1, 2, 30.0, "test/ports")
        out["push"] = g.receive()

    th = threading.Thread(target=worker_end)
    th.start()
    rank0.join_weight_group("gloo", addr, port, 2, 30.0, "test/ports")
    assert rank0.weight_group.send(7, [b"weights"]) == 7
    th.join(60)
    assert out["push"] == (7, [b"weights"])
    assert rank0._hosted_store is None  # the hosted store went to the group; the next group gets a new one
    assert rank0.master_address()[1] != port


def test_stores_hosted_at_once_each_hold_a_distinct_port():
    stores = [host_store("127.0.0.1", 10.0) for _ in range(20)]
    ports = [s.port for s in stores]
    assert len(set(ports)) == len(ports) and all(_taken(p) for p in ports)
    del stores


def test_an_unused_hosted_store_is_replaced_and_its_port_released(tmp_path):
    rank0 = _rank0(tmp_path)
    _, first = rank0.master_address()
    _, second = rank0.master_address()  # e.g. a weight group whose set-up failed before anyone joined
    assert first != second and _taken(second)
    gc.collect()
    assert not _taken(first)
