"""The ``[weights]`` section and the transport registry (`orchestrator.weights`)."""

from __future__ import annotations

import pkgutil

import pytest

import orchestrator.weights as weights
from orchestrator.config import ConfigError, load_config
from orchestrator.weights import TRANSPORTS, WeightsConfigBase, WeightTransport


def test_every_module_of_the_package_is_one_registered_transport():
    modules = {m.name for m in pkgutil.iter_modules(weights.__path__)} - {"base"}
    assert {t.__module__.rsplit(".", 1)[1] for t in TRANSPORTS.values()} == modules
    assert {"object_store", "collective"} <= set(TRANSPORTS)
    for name, t in TRANSPORTS.items():
        assert issubclass(t, WeightTransport) and issubclass(t.config, WeightsConfigBase)
        assert t.config().type == name  # the config's tag is the transport's name


def test_default_is_the_object_store_and_a_bare_name_loads_with_defaults():
    assert load_config(None).weights.type == "object_store"
    for name in TRANSPORTS:
        cfg = load_config(None, [f"weights={name}"]).weights
        assert cfg == TRANSPORTS[name].config()


def test_a_table_without_type_is_the_default_transport():
    cfg = load_config(None, ["weights.push_timeout_s=60"]).weights
    assert (cfg.type, cfg.push_timeout_s) == ("object_store", 60.0)


def test_a_transport_gets_its_own_knobs_only():
    cfg = load_config(None, ["weights.type=collective", "weights.backend=gloo", "weights.push_timeout_s=40",
                             "weights.bucket_bytes=2097152"]).weights
    assert (cfg.type, cfg.backend, cfg.push_timeout_s, cfg.bucket_bytes) == ("collective", "gloo", 40.0, 2 << 20)
    with pytest.raises(ConfigError, match="backend"):  # the object store has no backend
        load_config(None, ["weights.type=object_store", "weights.backend=gloo"])


def test_an_unknown_transport_names_the_known_ones():
    with pytest.raises(ConfigError, match="collective.*object_store"):
        load_config(None, ["weights=carrier_pigeon"])
    with pytest.raises(ConfigError, match="'collective', 'delta', 'object_store'"):
        load_config(None, ["weights.type=carrier_pigeon"])


@pytest.mark.parametrize("old,new", [("weight_transport=collective", "weights.type"),
                                     ("collective_backend=gloo", "weights.backend"),
                                     ("weight_bucket_bytes=2097152", "weights.bucket_bytes"),
                                     ("weight_push_timeout_s=40", "weights.push_timeout_s")])
def test_the_old_rollout_knobs_say_where_they_moved(old, new):
    with pytest.raises(ConfigError, match=f"rollout.{old.split('=')[0]} moved.*set {new}"):
        load_config(None, [f"rollout.{old}"])


NEW_TRANSPORT = '''
from typing import Literal

from pydantic import Field

from orchestrator.weights.base import WeightsConfigBase, WeightTransport


class SharedFsWeights(WeightsConfigBase):
    type: Literal["shared_fs"] = Field("shared_fs", description="buckets through a shared filesystem")
    path: str = Field("/dev/shm", description="where the buckets are written")


class SharedFsTransport(WeightTransport):
    type = "shared_fs"
    config = SharedFsWeights

    def push(self, version):
        return {}, {}
'''


def test_a_new_transport_is_one_new_module(tmp_path):
    """Dropping one module into orchestrator/weights/ registers the transport and makes [weights] accept it
    with its own knobs: no other file changes (checked on a copy of the package, in a fresh interpreter)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(weights.__file__).parents[2]
    shutil.copytree(root / "orchestrator", tmp_path / "orchestrator", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "orchestrator" / "weights" / "shared_fs.py").write_text(NEW_TRANSPORT)
    check = ("from orchestrator.config import load_config; from orchestrator.weights import TRANSPORTS; "
             "import orchestrator; assert orchestrator.__file__.startswith(%r), orchestrator.__file__; "
             "w = load_config(None, ['weights.type=shared_fs', 'weights.path=/mnt/x']).weights; "
             "print(sorted(TRANSPORTS), w.type, w.path, type(w).__name__)" % str(tmp_path))
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['collective',", "'delta',", "'object_store',", "'shared_fs']", "shared_fs", "/mnt/x",
                                  "SharedFsWeights"], out.stdout
