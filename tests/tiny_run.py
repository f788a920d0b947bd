"""The run config shared by integration tests on the tiny sums model: 1-digit sums, short answers,
fp32 on both sides (so rollout and learner logprobs agree to ~1e-4), a small KV cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from learner.worker import LearnerWorker
from orchestrator.config import RunConfig, load_config


TINY_RUN = (
    "num_steps=3", "prompts_per_step=4", "data.train_size=100", "data.eval_size=0", "data.one_shot=false",
    'data.task_config={min_terms = 2, max_terms = 2, max_digits = 1, operators = ["+"], '
    "allow_parentheses = false, allow_negation = false}",
    "rollout.group_size=4", "rollout.max_tokens=16", "rollout.dtype=float32",
    "rollout.kv_cache_memory_bytes=67108864", "rollout.max_model_len=256", "rollout.prompts_per_request=2",
    "learner.micro_batch_size=8", "learner.dtype=fp32", "learner.lr=1e-3",
)  # dotted overrides of the tiny run, as `relayrl train` takes them


def tiny_run_config(model: str, output_dir, *extra: str) -> RunConfig:
    """Tiny-model run config; ``extra`` dotted overrides win over the defaults here."""
    return load_config(None, [f"model.path={model}", f"output_dir={output_dir}", *TINY_RUN, *extra])


def tiny_run_toml(path: Path, model: str, output_dir, *extra: str) -> Path:
    """Write the tiny run as a TOML run config file at ``path`` (what ``relayrl train`` reads; ``extra`` dotted
    overrides win over the defaults here) and return ``path``.

    Raises:
        ConfigError: the result is not a valid run config (checked by loading the file back).
    """
    items: dict[str, str] = {}
    for item in (f"model.path={model}", f"output_dir={output_dir}", *TINY_RUN, *extra):
        key, raw = item.split("=", 1)
        try:
            tomllib.loads(f"v = {raw}")
        except tomllib.TOMLDecodeError:
            raw = json.dumps(raw)  # a bare string, as load_config reads it: a TOML string here
        items[key.strip()] = raw  # a later override replaces an earlier one (TOML refuses a key twice)
    path.write_text("".join(f"{k} = {v}\n" for k, v in items.items()))
    load_config(path)
    return path


class PacedLearner(LearnerWorker):
    """A real learner whose steps last at least ``min_step_s`` (3 s): long enough for an operator (a
    scale request, a crash) to act between pushes. Ray pickles this module by value (see conftest)."""

    min_step_s = 3.0

    def train_step(self, batch, version):
        t0 = time.monotonic()
        out = super().train_step(batch, version)
        time.sleep(max(0.0, self.min_step_s - (time.monotonic() - t0)))
        return out


def train_cli(cfg: Path, *extra: str, kill_when: Callable[[], bool] | None = None, timeout: float = 400) -> None:
    """Run ``relayrl train -q cfg extra...`` in a process group of its own and wait for it to succeed; with
    ``kill_when`` (a predicate polled every 0.2 s), SIGKILL the whole group (driver, Ray, actors: a preemption,
    no clean shutdown) as soon as it holds, and fail if the run finished first.

    Raises:
        TimeoutError: the run neither finished nor was killed within ``timeout`` seconds.
    """
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", "-q", str(cfg), *extra]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd} did not finish within {timeout} s")
            if kill_when is not None and kill_when():
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return
            time.sleep(0.2)
        out = proc.stdout.read()
        assert proc.returncode == 0, out[-3000:]
        assert kill_when is None, "the run finished before it could be killed"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
