"""The package layers hold: import-linter checks the contracts in pyproject.toml on the real code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 2 kept, 0 broken" in out.stdout, out.stdout


def test_a_broken_layer_is_reported(tmp_path):
    """The check can fail: a copy of the code where buffer/ imports the orchestrator breaks the layers."""
    import shutil

    for pkg in ("buffer", "rollout", "learner", "orchestrator"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "buffer" / "leak.py").write_text("from orchestrator import config\n")
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint), "--no-cache", str(tmp_path / "pyproject.toml")], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode != 0 and "buffer.leak -> orchestrator.config" in out.stdout, out.stdout + out.stderr
