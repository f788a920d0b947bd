"""Weight transports: the registry and the ``[weights]`` config section.

Each module of this package defines one transport (a `WeightTransport` subclass and its config class,
see `orchestrator.weights.base`); importing the package imports them all, so `TRANSPORTS` and the
``weights`` union of `orchestrator.config.RunConfig` list every transport that exists, with no second
copy of their names. Built in: ``object_store`` (the default) and ``collective``.

Config: ``[weights]`` with ``type = "..."`` and that transport's knobs, or just ``weights = "collective"``
(its defaults).
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Annotated, Any, Union

from pydantic import BeforeValidator, Field

from orchestrator.weights.base import Members, WeightsConfigBase, WeightTransport

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


DEFAULT_TRANSPORT = "object_store"
"""The transport of a config that names none."""


def _tagged(value: Any) -> Any:
    """``weights = "collective"`` means that transport with its defaults; a ``[weights]`` table without
    ``type`` means the default transport."""
    if isinstance(value, str):
        if value not in TRANSPORTS:
            raise ValueError(f"weights = {value!r} is not a weight transport; use one of {sorted(TRANSPORTS)}")
        return {"type": value}
    if isinstance(value, dict) and "type" not in value:
        return {"type": DEFAULT_TRANSPORT, **value}
    return value


WeightsConfig = Annotated[Union[tuple(t.config for t in TRANSPORTS.values())],  # noqa: UP007 (built from a tuple)
                          Field(discriminator="type"), BeforeValidator(_tagged)]
"""The ``[weights]`` section: one transport's config, chosen by its ``type``."""


def make_transport(cfg: WeightsConfigBase, *args: Any, **kwargs: Any) -> WeightTransport:
    """The transport ``cfg.type`` names, built with ``cfg`` and `WeightTransport`'s other arguments."""
    return TRANSPORTS[cfg.type](cfg, *args, **kwargs)


__all__ = ["DEFAULT_TRANSPORT", "TRANSPORTS", "Members", "WeightTransport", "WeightsConfig", "WeightsConfigBase", "make_transport"]
