"""A real Ray cluster on loopback (`ray start --head`), a tiny run submitted with `ray job submit`
using deploy/runtime_env.yaml: the job must succeed, connect to that cluster, and write its run dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ports import free_port
from ray_nodes import NO_DRAIN, agent_ports, stop_node

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_ray_job_submit_runs_a_tiny_job_on_a_started_cluster(tiny_model, tmp_path):
    bin_dir = Path(sys.executable).parent
    # Ray's token authentication must be configured the same way for `ray start`, the CLI and the driver
    env = {**os.environ, **NO_DRAIN, "RAY_AUTH_MODE": "disabled", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port, dash = free_port(), free_port()
    # Ray's unix socket paths live under the temp dir and must stay short (pytest's tmp_path is too long)
    ray_tmp = tempfile.mkdtemp(prefix="rrjob", dir="/tmp")
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--include-dashboard=true", f"--dashboard-port={dash}", "--disable-usage-stats",
         # every port of its own: another Ray instance on this machine (the test session's) holds the defaults
         *agent_ports(),
         f"--temp-dir={ray_tmp}"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out_dir = tmp_path / "runs"
        cmd = [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}",
               "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "deploy" / "runtime_env.yaml"), "--",
               "relayrl", "train", "-q", "deploy/examples/tiny_cpu.toml", f"model.path={tiny_model}",
               f"output_dir={out_dir}", "num_steps=1", "data.eval_size=4", "data.one_shot=false",
               "rollout.max_tokens=8", "rollout.kv_cache_memory_bytes=67108864", "rollout.max_model_len=256"]
        for _ in range(60):  # the dashboard's job API needs a few seconds after `ray start`
            probe = subprocess.run([str(bin_dir / "ray"), "job", "list", "--address", f"http://127.0.0.1:{dash}"],
                                   env=env, capture_output=True, text=True, timeout=60)
            if probe.returncode == 0:
                break
            if head.poll() is not None:
                pytest.fail(f"ray start exited: {head.stdout.read()[-2000:]}")
            subprocess.run(["sleep", "2"])
        for _ in range(15):  # ... and its job agent a few more ("No available agent to submit job")
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            log = job.stdout + job.stderr
            if "No available agent" not in log:
                break
            subprocess.run(["sleep", "2"])
        assert job.returncode == 0 and "succeeded" in log, log[-4000:]
        assert "connected to Ray cluster" in log, log[-4000:]  # joined this cluster, did not start its own
        (run_dir,) = [p for p in out_dir.iterdir() if p.is_dir()]
        assert (run_dir / "summary.json").is_file() and (run_dir / "final_model" / "config.json").is_file()
    finally:
        stop_node(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
