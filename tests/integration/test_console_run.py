"""What a person sees when running ``relayrl train`` on the tiny model, and what the run leaves on disk.

Real ``relayrl train`` subprocesses (each its own local Ray instance): the console of a short run holds
relayrl's progress and no vLLM/Ray/DeepSpeed chatter; ``<run_dir>/logs`` holds each component's full
log; ``-v`` brings the chatter back; an actor that raises reaches the console with its log file named.
The same run checks that credentials planted in the environment land in no file the run writes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
VLLM_LINE = re.compile(r"\b(INFO|WARNING) \d\d-\d\d \d\d:\d\d:\d\d \[")  # vLLM's own log format
MAX_CONSOLE_LINES = 25  # a quiet run prints ~10 lines; before the logs dir, ~70 on this model (~180 on SmolLM2)


def _start(tmp_path: Path, model: str, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    """Start ``relayrl train`` on the tiny model (``args``: more options and overrides), its stdout and stderr
    going to files in ``tmp_path`` (a pipe left unread would stall it); returns the process and ``tmp_path``."""
    out = tmp_path / "runs"
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", "deploy/examples/tiny_cpu.toml",
           f"model.path={model}", f"output_dir={out}", "ray.num_cpus=2", "data.eval_size=0", "rollout.max_tokens=16",
           "rollout.kv_cache_memory_bytes=67108864", *args]
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=stdout, stderr=stderr,
                                text=True), tmp_path


def _finish(proc: subprocess.Popen, tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """Wait (300 s at most) for a run `_start` started; returns it (with its output) and its run dir."""
    try:
        proc.wait(timeout=300)
    finally:
        proc.kill()
    stdout, stderr = (tmp_path / "stdout").read_text(), (tmp_path / "stderr").read_text()
    done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    out = tmp_path / "runs"
    runs = [p for p in out.iterdir() if p.is_dir()] if out.exists() else []
    assert len(runs) == 1, stdout[-3000:] + stderr[-3000:]
    return done, runs[0]


# a run whose rollout worker raises in its constructor (vLLM refuses a max_model_len beyond the model's)
FAILING_ACTOR = ("rollout.max_model_len=100000", "rollout.max_restarts=0")


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, tuple]:
    """The module's three runs, started side by side (each its own process and Ray instance):

    - ``quiet``: a short quiet run with checkpoints, TensorBoard and (when installed) offline W&B, with secrets
      in its environment: ``(process, run dir, the secrets)``;
    - ``failing`` and ``failing_verbose`` (``-v``): a run whose rollout worker raises: ``(process, run dir)``.
    """
    planted = {"AWS_SECRET_ACCESS_KEY": f"relayrl-test-secret-{secrets.token_hex(8)}",
               "WANDB_API_KEY": f"relayrl-test-secret-{secrets.token_hex(20)}"}
    extra = ["rollout.max_model_len=256", "checkpoint.every=1"]
    if importlib.util.find_spec("wandb"):
        extra += ["metrics.wandb_project=relayrl-secret-test", "metrics.wandb_mode=offline"]
    started = {"quiet": _start(tmp_path_factory.mktemp("quiet"), tiny_model, "-q", *extra,
                               env={**planted, "WANDB_SILENT": "true"}),
               "failing": _start(tmp_path_factory.mktemp("failing"), tiny_model, "-q", *FAILING_ACTOR),
               "failing_verbose": _start(tmp_path_factory.mktemp("verbose"), tiny_model, "-v", "-q", *FAILING_ACTOR)}
    try:
        done = {name: _finish(*s) for name, s in started.items()}
    finally:
        for proc, _ in started.values():
            proc.kill()
    return {**done, "quiet": (*done["quiet"], planted)}


@pytest.fixture
def quiet_run(runs):
    """The quiet run of `runs`, which must have succeeded: ``(process, run dir, the secrets)``."""
    proc, run_dir, planted = runs["quiet"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, run_dir, planted


def test_console_shows_relayrl_progress_not_the_engines_logs(quiet_run):
    proc, run_dir, _ = quiet_run
    console = (proc.stdout + proc.stderr).splitlines()
    assert len(console) < MAX_CONSOLE_LINES, "\n".join(console)
    assert not [x for x in console if VLLM_LINE.search(x) or "Attempted to load weight" in x], "\n".join(console)
    assert not [x for x in console if "DeepSpeed" in x or "Loading weights" in x], "\n".join(console)
    # no Ray error line at start-up (an actor handle among a restartable actor's constructor arguments)
    assert not [x for x in console if "core_worker.cc" in x], "\n".join(console)
    assert any("checkpoint written" in x for x in console) and proc.stdout.splitlines()[-1] == f"run dir: {run_dir}"


def test_logs_dir_holds_each_components_full_log(quiet_run):
    _, run_dir, _ = quiet_run
    logs = run_dir / "logs"
    rollout = (logs / "RolloutWorker.log").read_text()
    assert len([x for x in rollout.splitlines() if VLLM_LINE.search(x)]) >= 10  # vLLM's start-up and weight loads
    assert "INFO rollout.engine: vLLM engine up" in rollout  # relayrl's own INFO lines in actors, too
    assert (logs / "LearnerWorker.log").stat().st_size > 0
    driver = (logs / "driver.log").read_text()
    assert "INFO relayrl: run dir" in driver and "Started a local Ray instance" in driver  # Ray's own logger too


def test_no_secret_in_any_file_the_run_wrote(quiet_run):
    proc, run_dir, planted = quiet_run
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    wrote = {p.relative_to(run_dir).parts[0] for p in files}
    expected = {"config.json", "logs", "checkpoints", "final_model", "tensorboard", "metrics.jsonl", "summary.json"}
    assert expected <= wrote, wrote
    if importlib.util.find_spec("wandb"):
        assert "wandb" in wrote
    for name, secret in planted.items():
        leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaks, f"{name} found in {leaks}"
        assert secret not in proc.stdout + proc.stderr, name


def test_actor_error_reaches_the_console_naming_its_log(runs):
    proc, run_dir = runs["failing"]
    assert proc.returncode != 0
    log = run_dir / "logs" / "RolloutWorker.log"
    console = (proc.stdout + proc.stderr).splitlines()
    shown = [x for x in console if x.startswith("(RolloutWorker pid=") and x.endswith(f"[full log: {log}]")]
    assert any("Exception raised in creation task" in x for x in shown), "\n".join(console)
    assert any("max_model_len" in x or "ValidationError" in x for x in shown), "\n".join(console)
    (last,) = [x for x in console if x.startswith("relayrl: error:")]
    assert "RolloutWorker.__init__" in last and last.endswith(f"full log: {log}"), last
    assert not [x for x in console if VLLM_LINE.search(x)], "\n".join(console)
    assert "Traceback (most recent call last)" in log.read_text()  # the whole traceback is in the file


def test_verbose_brings_every_actor_line_back_to_the_console(runs):
    proc, run_dir = runs["failing_verbose"]
    assert proc.returncode != 0
    console = proc.stdout + proc.stderr
    assert len([x for x in console.splitlines() if VLLM_LINE.search(x)]) >= 3, console[-3000:]
    assert "Traceback (most recent call last)" in console
    assert VLLM_LINE.search((run_dir / "logs" / "RolloutWorker.log").read_text())  # and still in the file
