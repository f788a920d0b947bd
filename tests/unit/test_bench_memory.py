"""The ``learner_memory`` benchmark's arithmetic and its probe: ``/proc/<pid>/status`` memory lines in bytes, each
phase's peak and rise above the resident set it started from, and the probe's peak reset (this process)."""

from __future__ import annotations

import pytest

from tooling.bench_actors import MemoryProbeLearner
from tooling.bench_math import phase_memory, proc_status_bytes

STATUS = "Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t  300000 kB\nVmRSS:\t  120000 kB\nThreads:\t4\n"


def test_proc_status_lines_are_read_in_bytes():
    assert proc_status_bytes(STATUS) == {"VmHWM": 300000 * 1024, "VmRSS": 120000 * 1024}
    with pytest.raises(ValueError, match=r"no \['VmHWM'\] line.*/proc/<pid>/status"):
        proc_status_bytes("VmRSS:\t 12 kB\n")
    with pytest.raises(ValueError, match="expected a value in kB"):
        proc_status_bytes("VmHWM:\t 12 MB\nVmRSS:\t 1 kB\n")


def test_each_phase_rises_from_the_resident_set_the_last_one_left():
    readings = [("start", {"VmHWM": 500, "VmRSS": 400}), ("train step", {"VmHWM": 700, "VmRSS": 450}),
                ("export", {"VmHWM": 450, "VmRSS": 450})]
    assert phase_memory(readings) == {"start": {"peak": 500, "rss": 400, "rise": 500},
                                      "train step": {"peak": 700, "rss": 450, "rise": 300},
                                      "export": {"peak": 450, "rss": 450, "rise": 0}}


def test_the_probe_resets_the_peak_to_what_is_resident_now():
    big = bytearray(64 << 20)
    big[::4096] = b"\x01" * len(big[::4096])  # touch every page: 64 MiB resident
    del big
    before = MemoryProbeLearner.host_memory(None, reset_peak=True)
    assert before["VmHWM"] >= before["VmRSS"] + (60 << 20)  # the freed 64 MiB still in the peak
    after = MemoryProbeLearner.host_memory(None)
    assert after["VmHWM"] < before["VmHWM"] - (60 << 20)  # gone from the peak after the reset


def test_largest_parameter_is_read_from_the_config_without_weights(tiny_model):
    from transformers import AutoConfig

    from tooling.bench_memory import largest_parameter

    config = AutoConfig.from_pretrained(tiny_model)
    assert largest_parameter(tiny_model) == config.vocab_size * config.hidden_size  # the embedding
