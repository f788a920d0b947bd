"""The weight group's failure handling: a real gloo group (two members in threads of this process) whose
receiver stops reading, and the NCCL settings checked against the installed torch."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest
from ports import free_port

from base.weight_group import NCCL_WEIGHT_GROUP_ENV, WeightGroup, scoped_env


def _pair(timeout_s: float) -> tuple[WeightGroup, WeightGroup]:
    port = free_port()
    out: dict[int, WeightGroup] = {}

    def join(rank: int) -> None:
        out[rank] = WeightGroup("gloo", "127.0.0.1", port, rank, 2, timeout_s, f"test/{port}")

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out[0], out[1]


def test_a_send_to_a_peer_that_stops_reading_raises_within_the_timeout_and_breaks_the_group():
    sender, receiver = _pair(timeout_s=10.0)  # margins wide enough for a loaded 2-core machine
    got = {}
    th = threading.Thread(target=lambda: got.setdefault("push", receiver.receive()))
    th.start()
    assert sender.send(1, [b"a" * 1000, b"b" * 10]) == 1010
    th.join(30)
    assert got["push"] == (1, [b"a" * 1000, b"b" * 10])
    t0 = time.monotonic()  # the receiver never takes the next push
    with pytest.raises(RuntimeError, match="timed out"):
        sender.send(2, [b"a" * 1000], timeout_s=1.0)  # a tighter bound than the group's timeout
    assert time.monotonic() - t0 < 5.0  # the send's 1 s, not the group's 10 s
    assert sender.broken is not None
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"weight group test/\d+ is broken .*build a new one"):
        sender.send(3, [b"c"])
    assert time.monotonic() - t0 < 5.0  # refused at once, no second 10 s wait


def test_scoped_env_sets_then_restores_set_and_unset_variables(monkeypatch):
    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "0")
    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    with scoped_env(NCCL_WEIGHT_GROUP_ENV):
        assert {k: os.environ[k] for k in NCCL_WEIGHT_GROUP_ENV} == NCCL_WEIGHT_GROUP_ENV
    assert os.environ["TORCH_NCCL_BLOCKING_WAIT"] == "0"
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in os.environ


def test_nccl_settings_mean_what_the_installed_torch_reads():
    """The NCCL group is not built here (no GPU): check the chosen values against the installed torch's
    ProcessGroupNCCL header, so a torch upgrade that renames or renumbers them fails here."""
    import torch

    header = Path(torch.__file__).parent / "include/torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp"
    if not header.exists():
        pytest.skip(f"{header} is not shipped with this torch build")
    src = header.read_text()
    modes = dict((name, int(v)) for name, v in re.findall(r"^\s*(\w+) = (\d+),?$", src.split("enum ErrorHandlingMode")[1]
                                                           .split("};")[0], re.M))
    assert modes["CleanUpOnly"] == int(NCCL_WEIGHT_GROUP_ENV["TORCH_NCCL_ASYNC_ERROR_HANDLING"])
    # CleanUpOnly aborts the communicator without tearing the process down
    assert "#define SHOULD_TEAR_DOWN(a) (a != NoHandling && a != CleanUpOnly)" in src
    assert "#define SHOULD_CLEAN_UP(a) (a != NoHandling && a != SkipCleanUp)" in src
    for name in NCCL_WEIGHT_GROUP_ENV:
        assert f'"{name}"' in src, name
