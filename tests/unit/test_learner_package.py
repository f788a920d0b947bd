"""`learner`'s public surface: every exported name resolves, and importing the package stays light."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import learner


def test_every_exported_name_resolves():
    for name in learner.__all__:
        assert getattr(learner, name) is not None
    assert learner.LearnerWorker.__module__ == "learner.worker"
    assert set(learner.ADVANTAGE_ESTIMATORS) == {"grpo", "drgrpo", "rloo", "reinforce_pp", "spo"}


def test_import_learner_loads_no_heavy_module():
    code = ("import sys, learner, learner.group, learner.worker, learner.batching, learner.config, learner.losses, "
            "learner.advantages, learner.metrics; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'ray', 'vllm', 'transformers') if m in sys.modules))")
    root = str(Path(learner.__file__).resolve().parents[1])  # this checkout, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=root)
    assert out.stdout.strip() == "[]"
