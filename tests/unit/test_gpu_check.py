"""`tooling.gpu_check` on a machine without CUDA: a one-line error, exit 2, no JSON; its rows' verdicts."""

from __future__ import annotations

import pytest

from tooling import gpu_check


def test_without_cuda_it_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA device" in err[0] and "make install-gpu" in err[0], err
    assert not out.exists()


def test_a_row_names_the_cause_of_a_failure_or_a_timeout():
    ok = gpu_check._row("main_job", 0, "fine\n", 12.34, 60)
    assert ok == {"step": "main_job", "status": "ok", "seconds": 12.3}
    failed = gpu_check._row("lora", 1, "line one\nRuntimeError: CUDA out of memory\n\n", 5.0, 60)
    assert failed["status"] == "failed" and failed["error"] == "exit 1: RuntimeError: CUDA out of memory"
    hung = gpu_check._row("conformance", None, "", 100.0, 100)
    assert hung["status"] == "failed" and hung["error"] == "no result in 100 s"
