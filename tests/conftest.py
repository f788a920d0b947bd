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


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)
