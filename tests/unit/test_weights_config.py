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
    with pytest.raises(ConfigError, match="'collective', 'object_store'"):
        load_config(None, ["weights.type=carrier_pigeon"])


@pytest.mark.parametrize("old,new", [("weight_transport=collective", "weights.type"),
                                     ("collective_backend=gloo", "weights.backend"),
                                     ("weight_bucket_bytes=2097152", "weights.bucket_bytes"),
                                     ("weight_push_timeout_s=40", "weights.push_timeout_s")])
def test_the_old_rollout_knobs_say_where_they_moved(old, new):
    with pytest.raises(ConfigError, match=f"rollout.{old.split('=')[0]} moved.*set {new}"):
        load_config(None, [f"rollout.{old}"])
