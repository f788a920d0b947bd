"""Bad input gives a one-line error naming the problem and exit code 2, never a deep traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "deploy" / "examples" / "arithmetic_smollm2.toml")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args,needle", [
    ((CFG, "model.path=/no/such/model"), "model path '/no/such/model' does not exist"),
    ((CFG, "learner.lr=fast"), "learner.lr"),
    (("/no/such.toml",), "does not exist"),
])
def test_bad_input_is_one_line(args, needle):
    r = _run("train", *args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("relayrl: error")]) == 1


def test_empty_dataset_is_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = _run("train", CFG, "data.type=jsonl", f"data.path={empty}")
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_help_is_fast_and_lists_train():
    r = _run("--help")
    assert r.returncode == 0 and "train" in r.stdout
