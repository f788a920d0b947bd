"""A two-node Ray cluster whose second node cannot see the driver's files, as on separate machines.

Both raylets run on this machine; node 2 runs inside a private mount namespace (``unshare -m``) with
a tmpfs over the folder that holds the model, the run outputs and the model cache, so processes on
node 2 see it empty. Each case runs ``relayrl train`` against the cluster, SIGKILLs the driver after a
checkpoint, resumes, and checks that every trained group was trained once:

- the rollout worker and learner rank 1 on node 2, rank 0 on the head, model and run outputs on an S3
  server (moto on loopback): each node copies the model from the bucket once (and reuses it after the
  resume), each rank uploads its own checkpoint shards, and the worker plays a user's environment and scores
  with a user's reward function whose modules only the driver has (Ray's runtime_env ``py_modules`` ships them:
  `base.user_code.ship_user_code`).

Two more cases: a learner rank on node 2 with a local run dir is a one-line error; and node 2 lost mid-run
(SIGKILL of all its processes) is replaced by a new node whose rollout worker copies the model from the
driver's node and finishes the run.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from base import storage
from orchestrator.checkpoint import find_run_to_resume
from orchestrator.run_outputs import logs_dir_of
from ports import free_port
from ray_nodes import NO_DRAIN, agent_ports, kill_mount_namespace, stop_nodes
from tiny_run import tiny_run_toml, train_cli

pytestmark = pytest.mark.integration
P, STEPS = 4, 3  # tiny_run.TINY_RUN: prompts per step, steps
BIN = Path(sys.executable).parent


def _ports() -> list[str]:
    """Every listening port of one raylet, free: two raylets share this machine."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}", *agent_ports()]


class Cluster:
    """A head node (this machine's view; resource ``head``) and nodes that cannot see ``hidden`` (each in a
    private mount namespace with a tmpfs over it). ``env`` has the S3 credentials and the cache dir."""

    def __init__(self, root: Path, env: dict) -> None:
        self.hidden, self.env, self.nodes = root / "hidden", env, []
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", f"--port={port}", "--include-dashboard=false",
             f"--temp-dir={root / 'ray'}", '--resources={"learner_slot": 1, "head": 1}', *COMMON, *_ports()],
            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_nodes(1)

    def add_hidden_node(self, resources: str) -> subprocess.Popen:
        """Start a node with the custom ``resources`` (a JSON object) that sees an empty ``hidden``."""
        cmd = " ".join([str(BIN / "ray"), "start", f"--address={self.address}", f"--resources='{resources}'",
                        *COMMON, *_ports()])
        node = subprocess.Popen(["unshare", "-m", "--propagation", "private", "bash", "-c",
                                 f"mount -t tmpfs tmpfs {self.hidden} && mkdir -p {self.hidden}/cache && exec {cmd}"],
                                env=self.env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        self.nodes.append(node)
        self.wait_nodes(1 + sum(n.poll() is None for n in self.nodes))
        return node

    def wait_nodes(self, n: int, timeout_s: float = 300) -> None:
        """Wait until ``n`` nodes are alive (generous: a loaded 2-core machine starts one in 10-60 s)."""
        status = [str(BIN / "ray"), "status", f"--address={self.address}"]
        deadline = time.monotonic() + timeout_s
        while True:
            probe = subprocess.run(status, env=self.env, capture_output=True, text=True, timeout=60)
            active = probe.stdout.split("Pending:")[0]
            if probe.returncode == 0 and active.count("node_") == n:
                return
            dead = [p for p in [self.head, *self.nodes] if p.poll() is not None and p.returncode not in (0, -9)]
            if dead or time.monotonic() > deadline:
                logs = dead[0].stdout.read()[-2000:] if dead and dead[0].stdout else ""
                pytest.fail(f"{n} Ray nodes were not up within {timeout_s:.0f} s: {probe.stdout[-1500:]} {logs}")
            time.sleep(2)

    def stop(self) -> None:
        stop_nodes([*self.nodes, self.head])  # all at once: each takes seconds to stop its processes


COMMON = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats"]


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A `Cluster` with node 2 (resources ``node2``, ``learner_slot``) that cannot see ``hidden``, which
    holds the models, run outputs and model cache of the tests."""
    root = Path(tempfile.mkdtemp(prefix="rr2n", dir="/tmp"))  # short: Ray's socket paths live under it
    (root / "hidden" / "cache").mkdir(parents=True)
    env = {**os.environ, **NO_DRAIN, "RAY_AUTH_MODE": "disabled", "PATH": f"{BIN}:{os.environ['PATH']}",
           "RELAYRL_CACHE": str(root / "hidden" / "cache"), "AWS_ACCESS_KEY_ID": "relayrl-test-key",
           "AWS_SECRET_ACCESS_KEY": f"relayrl-secret-{uuid.uuid4().hex}", "AWS_ENDPOINT_URL": s3_server,
           "AWS_DEFAULT_REGION": "eu-west-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    env.pop("RAY_ADDRESS", None)
    c = None
    try:
        c = Cluster(root, env)
        c.add_hidden_node('{"node2": 1, "learner_slot": 1}')
        yield c
    finally:
        if c is not None:
            c.stop()
        shutil.rmtree(root, ignore_errors=True)


def _config(path: Path, model: str, output, cluster: Cluster, *extra: str) -> Path:
    """The tiny run against ``cluster`` (a checkpoint every step), with dotted overrides ``extra``."""
    return tiny_run_toml(path, model, output, "name=twonode", "seed=5", "checkpoint.every=1", "checkpoint.keep=2",
                         "rollout.num_cpus=1", "learner.num_cpus=0.5", f"ray.address={cluster.address}", *extra)


def _train_twice(cfg: Path, env: dict, output: str) -> tuple[str, datetime.datetime]:
    """Train, SIGKILL the driver after its first checkpoint, resume; returns the run's URI and the local time
    the resume started."""
    old = dict(os.environ)
    os.environ.update(env)  # train_cli's driver inherits this process's environment
    try:
        train_cli(cfg, kill_when=lambda: find_run_to_resume(output, "twonode") is not None, timeout=420)
        resumed_at = datetime.datetime.now()
        train_cli(cfg, "--resume", timeout=420)
    finally:
        os.environ.clear()
        os.environ.update(old)
    return find_run_to_resume(output, "twonode"), resumed_at


def _trained_groups(run: str) -> list:
    rows = storage.read_bytes(storage.join(run, "trained_groups.jsonl")).decode().splitlines()
    return [g for r in rows if r.strip() for g in json.loads(r)["groups"]]


# A user's reward function: 0.25 where it runs from a shipped copy of its module on a node that cannot see the
# driver's files (node 2), 0.75 anywhere else. Weight 0: the run's reward stays the exact match.
WHERE_AM_I = """import os
HIDDEN = {hidden!r}
def where_am_i(prompts, completions, **columns):
    shipped = not os.path.realpath(__file__).startswith(HIDDEN)
    on_node2 = not os.path.exists(os.path.join(HIDDEN, "node2.toml"))
    return [0.25 if shipped and on_node2 else 0.75] * len(completions)
"""

# A user's environment (the single-turn task) in a module of its own: each step adds a reward term "env_where", 0.25
# where it runs from a shipped copy of its module on node 2, 0.75 anywhere else (a term only: the reward is unchanged)
WHERE_AM_I_ENV = """import os
from rollout.envs.builtin import SingleTurn
HIDDEN = {hidden!r}
class WhereAmI(SingleTurn):
    def step(self, action):
        res = super().step(action)
        shipped = not os.path.realpath(__file__).startswith(HIDDEN)
        on_node2 = not os.path.exists(os.path.join(HIDDEN, "node2.toml"))
        res.info["reward_terms"] = {{**res.info.get("reward_terms", {{}}), "env_where": 0.25 if shipped and on_node2
                                    else 0.75}}
        return res
"""


@pytest.mark.timeout(1200)
def test_rollout_worker_and_a_learner_rank_on_a_node_without_the_drivers_files(cluster, tiny_sums_model, monkeypatch):
    """The rollout worker and learner rank 1 on node 2, rank 0 on the head; model and run outputs on S3."""
    import boto3

    hidden = cluster.hidden
    bucket = f"relayrl-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=cluster.env["AWS_ENDPOINT_URL"], region_name="eu-west-1",
                      aws_access_key_id=cluster.env["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=cluster.env["AWS_SECRET_ACCESS_KEY"])
    s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    for f in Path(tiny_sums_model).iterdir():
        s3.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    # content of its own: neither node may find another test's copy of the same model in its cache
    s3.put_object(Bucket=bucket, Key="models/tiny/README.md", Body=bucket.encode())
    # the user's modules exist only in a dir of the driver's (node 2 has a tmpfs over hidden)
    tag = uuid.uuid4().hex[:8]
    user_dir, module, env_module = hidden / "user_code", f"relayrl_user_rewards_{tag}", f"relayrl_user_envs_{tag}"
    user_dir.mkdir()
    (user_dir / f"{module}.py").write_text(WHERE_AM_I.format(hidden=str(hidden.resolve())))
    (user_dir / f"{env_module}.py").write_text(WHERE_AM_I_ENV.format(hidden=str(hidden.resolve())))
    monkeypatch.syspath_prepend(str(user_dir))  # tiny_run_toml loads the config here too
    env = {**cluster.env, "PYTHONPATH": os.pathsep.join(filter(None, [str(user_dir),
                                                                      cluster.env.get("PYTHONPATH")]))}
    output = f"s3://{bucket}/runs"
    # one learner slot per node: rank 0 on the head, rank 1 on node 2 with the rollout worker
    cfg = _config(hidden / "node2.toml", f"s3://{bucket}/models/tiny", output, cluster, "learner.num_learners=2",
                  "learner.resources={learner_slot = 1}", "rollout.resources={node2 = 1}",
                  f'rollout.rewards=[{{fn = "exact_match"}}, {{fn = "{module}:where_am_i", weight = 0.0}}]',
                  f"rollout.env.type={env_module}:WhereAmI", "rollout.env.max_episode_tokens=16")
    run, resumed_at = _train_twice(cfg, env, output)

    trained = _trained_groups(run)
    assert len(trained) == STEPS * P and len(set(trained)) == len(trained)  # nothing lost, nothing twice
    summary = json.loads(storage.read_bytes(storage.join(run, "summary.json")))
    assert summary["step"] == STEPS and storage.exists(storage.join(run, "final_model", "config.json"))
    # each rank uploaded its own part of the checkpoint
    first = storage.join(run, "checkpoints", storage.children(storage.join(run, "checkpoints"))[0])
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(storage.children(storage.join(first, "learner")))
    # each node copied the model from the bucket once, into its own cache (a file lock makes the actors of one
    # node share a copy); the resumed run's actors found those copies by content and copied nothing. Distinct
    # lines: both raylets share one session dir on this machine, so both log monitors stream each line
    logs = logs_dir_of(run)
    copies = {ln for name in ("RolloutWorker.log", "LearnerWorker.log") for ln in (logs / name).read_text().splitlines()
              if "copied model" in ln}
    assert 1 <= len(copies) <= 2 and all(f"from s3://{bucket}/models/tiny" in ln for ln in copies), copies
    stamps = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
              for m in (re.search(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+)", ln) for ln in copies) if m]
    assert len(stamps) == len(copies) and max(stamps) < resumed_at, (copies, resumed_at)
    # the user's reward and environment ran on node 2, from the copies of their modules that Ray shipped there,
    # wherever they ran: a step's row has the keys only when the step generated groups (a resumed run's first step
    # may train on groups restored with the buffer), so the count of rows is not asserted, only that every one
    # says node 2 and that no sample failed the function or the environment
    rows = _jsonl(storage.join(run, "metrics.jsonl"))
    for key in ("rollout/reward/where_am_i", "rollout/reward/env_where"):
        where = [r[key] for r in rows if key in r]
        assert where and set(where) == {0.25}, (key, where)
    assert all(r.get("rollout/env_failed_frac", 0.0) == 0.0 for r in rows), rows
    assert all(r.get("rollout/reward_failures/where_am_i", 0.0) == 0.0 for r in rows), rows


def _jsonl(uri: str) -> list[dict]:
    return [json.loads(r) for r in storage.read_bytes(uri).decode().splitlines() if r.strip()]


@pytest.mark.timeout(600)
def test_a_local_run_dir_that_a_learner_node_cannot_see_is_a_one_line_error(cluster, tiny_sums_model):
    """A learner rank on node 2 would write checkpoints and the final model into a local output_dir that only
    node 2 sees: its start-up probe file is missing on the driver's side, so the run stops naming the fix before
    any step trains, instead of a run that cannot resume or loses its trained model at the end."""
    hidden, env = cluster.hidden, cluster.env
    model = hidden / "model_local_out"
    shutil.copytree(tiny_sums_model, model)
    cfg = _config(hidden / "local_out.toml", str(model), hidden / "runs_local", cluster,
                  "rollout.resources={head = 1}", "learner.resources={node2 = 1}")
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", "-q", str(cfg), "num_steps=1"],
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode != 0
    err = [ln for ln in proc.stderr.splitlines() if "not shared by every node" in ln]
    assert err and "start-up probe" in err[0] and "set output_dir to a storage URI" in err[0], proc.stderr[-3000:]
    trained = [r for p in (hidden / "runs_local").glob("*/metrics.jsonl") for r in p.read_text().splitlines()
               if r.strip() and json.loads(r).get("step", 0) >= 1]
    assert not trained, trained  # refused before the first step


@pytest.mark.timeout(1200)
def test_a_lost_node_is_replaced_and_its_rollout_worker_restarts_there(cluster, tiny_sums_model):
    """Runs last: it kills node 2. The rollout worker on node 2 dies with its node mid-run; a new node
    with the same resource joins (as an autoscaler or KubeRay would bring one), the worker's placement
    moves there, the worker restarts, copies the model to that node, and the run finishes with every
    group trained once."""
    hidden, env = cluster.hidden, cluster.env
    model = hidden / "model_node_loss"
    shutil.copytree(tiny_sums_model, model)
    output = hidden / "runs_node_loss"
    # enough steps that the run still needs generation after node 2 dies: a tiny-model step takes ~0.1-0.2 s
    # here, and with 5 steps the whole run once finished within the kill's polling interval (CI, 2026-12-02)
    steps = 30
    cfg = _config(hidden / "node_loss.toml", str(model), output, cluster, "rollout.resources={node2 = 1}",
                  "learner.resources={head = 1}")
    driver = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "train", "-q", str(cfg), f"num_steps={steps}",
                               "checkpoint.every=100"], env=env, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not any(r.get("step", 0) >= 1 for p in output.glob("*/metrics.jsonl")
                      for r in map(json.loads, p.read_text().splitlines())):
            assert driver.poll() is None and time.monotonic() < deadline, driver.stdout.read()[-3000:]
            time.sleep(0.5)
        (node2,) = [n for n in cluster.nodes if n.poll() is None]
        killed_at = datetime.datetime.now()
        assert kill_mount_namespace(node2.pid) > 1  # the node and every process on it, at once
        node2.wait(60)
        at_kill = max(r.get("step", 0) for p in output.glob("*/metrics.jsonl")
                      for r in map(json.loads, p.read_text().splitlines()))
        assert at_kill < steps, f"the run ended (step {at_kill}) before node 2 was killed: raise steps"
        cluster.add_hidden_node('{"node2": 1}')
        out, _ = driver.communicate(timeout=900)
        logs = "".join(p.read_text()[-6000:] for p in output.glob("*/logs/driver.log"))
        assert driver.returncode == 0, out[-3000:] + logs
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    (run,) = [str(p) for p in output.iterdir() if p.is_dir()]
    trained = _trained_groups(run)
    assert len(trained) == steps * P and len(set(trained)) == len(trained)
    metrics = [json.loads(r) for r in (Path(run) / "metrics.jsonl").read_text().splitlines() if r.strip()]
    assert max(r.get("step", 0) for r in metrics) == steps
    assert max(r.get("rollout/worker_restarts", 0) for r in metrics) >= 1
    # the restarted worker copied the model to the new node. (The first worker's own copy line may never
    # reach the driver: it dies with its node, whose log monitor streams the worker's file.)
    log = (logs_dir_of(run) / "RolloutWorker.log").read_text()
    copied = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
              for m in re.finditer(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) INFO base\.model_source: copied model", log)]
    assert any(t > killed_at for t in copied), log[-3000:]
