"""Weight transports: the registry and the ``[weights]`` config section.

Each module of this package defines one transport (a `WeightTransport` subclass and its config class,
see `orchestrator.weights.base`); importing the package imports them all, so `TRANSPORTS` and the
``weights`` union of `orchestrator.config.RunConfig` list every transport that exists, with no second
copy of their names. Built in: ``object_store`` (the default), ``collective`` and ``delta``.

Config: ``[weights]`` with ``type = "..."`` and that transport's knobs, or just ``weights = "collective"``
(its defaults).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from base.config import tagged_union
from orchestrator.weights.base import Members, WeightsConfigBase, WeightTransport
from orchestrator.weights.object_store import ObjectStoreWeights

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")


def _registered() -> dict[str, type[WeightTransport]]:
    found: dict[str, type[WeightTransport]] = {}
    todo = list(WeightTransport.__subclasses__())
    while todo:
        t = todo.pop()
        todo += t.__subclasses__()
        if t.__module__.startswith(f"{__name__}.") and "type" in t.__dict__:
            found.setdefault(t.type, t)
    return dict(sorted(found.items()))


TRANSPORTS: dict[str, type[WeightTransport]] = _registered()
"""Weight transports by ``weights.type``."""


WeightsConfig = tagged_union("weights", [t.config for t in TRANSPORTS.values()], ObjectStoreWeights)
"""The ``[weights]`` section: one transport's config, chosen by its ``type`` (default ``object_store``)."""


def make_transport(cfg: WeightsConfigBase, *args: Any, **kwargs: Any) -> WeightTransport:
    """The transport ``cfg.type`` names, built with ``cfg`` and `WeightTransport`'s other arguments."""
    return TRANSPORTS[cfg.type](cfg, *args, **kwargs)


__all__ = ["TRANSPORTS", "Members", "WeightTransport", "WeightsConfig", "WeightsConfigBase", "make_transport"]
