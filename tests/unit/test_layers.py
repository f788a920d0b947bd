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


def _lint_copy(tmp_path, leaks: dict[str, str]) -> subprocess.CompletedProcess:
    """lint-imports on a copy of the code with the extra modules ``leaks`` (path -> source) added."""
    import shutil

    for pkg in ("base", "buffer", "rollout", "learner", "orchestrator", "tooling"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    for path, src in leaks.items():
        (tmp_path / path).write_text(src)
    lint = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(lint), "--no-cache", str(tmp_path / "pyproject.toml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})


def test_a_broken_layer_is_reported(tmp_path):
    """The check can fail: a copy of the code where base/ imports buffer/ (one layer up) breaks the layers."""
    out = _lint_copy(tmp_path, {"base/leak.py": "from buffer import sample\n"})
    assert out.returncode != 0 and "base.leak -> buffer.sample" in out.stdout, out.stdout + out.stderr


def test_a_new_core_module_importing_the_tooling_is_reported(tmp_path):
    """The tooling contract covers every core module by package, including one that did not exist when it
    was written: a new orchestrator module importing tooling breaks it."""
    out = _lint_copy(tmp_path, {"orchestrator/brand_new.py": "from tooling import bench_math\n"})
    assert out.returncode != 0 and "orchestrator.brand_new -> tooling.bench_math" in out.stdout, \
        out.stdout + out.stderr
