"""A user's own code named in a run config by an import path ``"pkg.module:name"`` (a reward function, an
environment class): resolved on the driver when the config loads, and again in each actor that runs it.

Resolution follows Ray's own rule for a local run: the driver's working dir is on the import path (Ray puts
the driver's working dir on every local worker's path too), so a ``rewards.py`` beside the run config works
as ``"rewards:fn"``. A module found elsewhere (``PYTHONPATH``, a path a test added) is reached by the actors
through `code_roots`, which the actor groups add to their workers' ``PYTHONPATH``. On a cluster a module must
also exist on the other nodes: ship it with ``ray job submit --working-dir`` or runtime_env ``py_modules``.

Left out on purpose: file paths (``/x/rewards.py:fn``; a module name only) and installing packages.
"""

from __future__ import annotations

import importlib
import os
import site
import sys
import sysconfig
from typing import Any


def is_import_path(value: str) -> bool:
    """Whether ``value`` names user code (``"pkg.module:name"``) rather than a built-in registry name."""
    return ":" in value


def _working_dir_on_path() -> None:
    """Put the driver's working dir on ``sys.path`` (last, so it shadows nothing) as Ray does for its local
    workers; a console script (``relayrl train``) does not have it there."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)


def import_object(path: str, field: str) -> Any:
    """The object ``name`` of module ``pkg.module`` for ``path = "pkg.module:name"`` (``name`` may be dotted:
    ``"pkg.mod:Class.method"``).

    Args:
        path: the import path.
        field: the config field that holds it, for error messages (``rollout.rewards[1].fn``).

    Raises:
        ValueError: one line naming ``field`` and ``path``: not of the form ``"pkg.module:name"``, the module
            cannot be imported (missing, or its import raised), or it has no such attribute.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name.strip() or not attr.strip() or ":" in attr:
        raise ValueError(f"{field} = {path!r} is not an import path of the form 'pkg.module:name'")
    _working_dir_on_path()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
            raise ValueError(f"{field} = {path!r}: importing {module_name!r} raised ModuleNotFoundError: {e} (a "
                             "package it imports is not installed here)") from None
        raise ValueError(
            f"{field} = {path!r}: module {module_name!r} cannot be imported ({e}); put it in the working dir "
            f"({os.getcwd()}) or on PYTHONPATH, or install it (on a cluster also ship it to every node: ray job "
            "submit --working-dir, or runtime_env py_modules)") from None
    except Exception as e:  # noqa: BLE001 - any error in the user's module is reported as this field's error
        raise ValueError(f"{field} = {path!r}: importing {module_name!r} raised {type(e).__name__}: {e}"
                         .replace("\n", " ")) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            where = getattr(module, "__file__", None) or module_name
            raise ValueError(f"{field} = {path!r}: {module_name!r} ({where}) has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _installed_dirs() -> set[str]:
    dirs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    return {os.path.realpath(d) for d in dirs}


def code_roots(paths: list[str]) -> list[str]:
    """The ``sys.path`` dirs the driver imported the modules of these import paths from, leaving out the
    interpreter's own and installed packages' dirs (every worker has those): what an actor started from
    another working dir needs on its ``PYTHONPATH``. Paths that are built-in names are skipped; the modules
    must have been imported already (`import_object`)."""
    roots: list[str] = []
    installed = _installed_dirs()
    for path in paths:
        if not is_import_path(path):
            continue
        top = sys.modules.get(path.partition(":")[0].split(".")[0])
        if top is None:
            continue
        file = getattr(top, "__file__", None)
        if file:  # a package's __init__.py sits one level below its root, a plain module at the root
            root = os.path.dirname(os.path.dirname(file) if os.path.basename(file).startswith("__init__.")
                                   else file)
        else:  # a namespace package
            locations = list(getattr(top, "__path__", []))
            root = os.path.dirname(locations[0]) if locations else ""
        root = os.path.realpath(root) if root else ""
        if root and root not in installed and root not in roots:
            roots.append(root)
    return roots
