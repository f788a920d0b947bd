"""Run metrics: one JSONL line and one set of TensorBoard scalars per learner step.

Keys are ``component/name`` (``rollout/reward_mean``, ``off_policy/staleness_max``...). Every line
also carries ``step`` and ``time/elapsed_s`` (wall clock since the run started).

Left out on purpose: Weights & Biases (a later addition).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    """Writes ``metrics.jsonl`` and TensorBoard events under ``run_dir``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._t0 = time.time()

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Record ``metrics`` at ``step``; returns the record written (with step and elapsed time)."""
        rec = {"step": step, "time/elapsed_s": round(time.time() - self._t0, 3)}
        for k, v in metrics.items():
            v = float(v)
            rec[k] = v if math.isfinite(v) else None
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps(rec) + "\n")
        return rec

    def close(self) -> None:
        """Flush and close both sinks."""
        self._jsonl.close()
        self._tb.close()
