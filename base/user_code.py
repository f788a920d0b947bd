"""A user's own code named in a run config by an import path ``"pkg.module:name"`` (a reward function, an
environment class): resolved on the driver when the config loads, and again in each actor that runs it.

Resolution follows Ray's own rule for a local run: the driver's working dir is on the import path (Ray puts
the driver's working dir on every local worker's path too), so a ``rewards.py`` beside the run config works
as ``"rewards:fn"``. A module found elsewhere (``PYTHONPATH``, a path a test added) is reached by the actors
through `code_roots`, which the actor groups add to their workers' ``PYTHONPATH``. Other nodes, which may not
have the driver's files, get every user module the driver imported through the job's runtime_env ``py_modules``
(`ship_user_code`, called by ``relayrl train`` when it starts or joins Ray): Ray uploads each module's file or
package dir once and every node's workers import it from their copy. A module that imports a sibling module of
its own dir must name it too (or be a package): only the modules imported by an import path are shipped.

Left out on purpose: file paths (``/x/rewards.py:fn``; a module name only) and installing packages.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import site
import sys
import sysconfig
from typing import Any

logger = logging.getLogger(__name__)
_IMPORTED: dict[str, None] = {}  # top-level module names `import_object` imported in this process, in order

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
    _IMPORTED[module_name.split(".")[0]] = None
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


def _origin(top_name: str) -> tuple[str, str] | None:
    """``(sys.path root, module file or package dir)`` of imported top-level module ``top_name``, or None for
    one not imported, installed (the interpreter's or site-packages: every worker has it) or without a file."""
    top = sys.modules.get(top_name)
    if top is None:
        return None
    file = getattr(top, "__file__", None)
    if file:  # a package's __init__.py sits one level below its root, a plain module at the root
        source = os.path.dirname(file) if os.path.basename(file).startswith("__init__.") else file
    else:  # a namespace package
        locations = list(getattr(top, "__path__", []))
        source = locations[0] if locations else ""
    if not source:
        return None
    source = os.path.realpath(source)
    root = os.path.dirname(source)
    return None if root in _installed_dirs() else (root, source)


def code_roots(paths: list[str]) -> list[str]:
    """The ``sys.path`` dirs the driver imported the modules of these import paths from, leaving out the
    interpreter's own and installed packages' dirs (every worker has those): what an actor started from
    another working dir needs on its ``PYTHONPATH``. Paths that are built-in names are skipped; the modules
    must have been imported already (`import_object`)."""
    roots: list[str] = []
    for path in paths:
        if not is_import_path(path):
            continue
        origin = _origin(path.partition(":")[0].split(".")[0])
        if origin is not None and origin[0] not in roots:
            roots.append(origin[0])
    return roots


def user_modules() -> list[str]:
    """The files (a module) and dirs (a package) of the top-level user modules `import_object` imported in
    this process, installed ones left out: what runtime_env ``py_modules`` carries to every node."""
    found = [_origin(name) for name in _IMPORTED]
    return list(dict.fromkeys(origin[1] for origin in found if origin is not None))


def ship_user_code(runtime_env: dict[str, Any]) -> dict[str, Any]:
    """``runtime_env`` (the job's, before ``ray.init``) with `user_modules` added as ``py_modules``, so actors
    on every node import the user code the run config names, also where the driver's files are not.

    A job submitted with ``py_modules`` of its own (``ray job submit --runtime-env-json``) is left as it is:
    Ray refuses to merge the same field from the submission and from ``ray.init``, and the submitter's list is
    then the one that must hold the user's modules (logged).
    """
    modules = user_modules()
    if not modules:
        return runtime_env
    submitted = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env") or {}
    if "py_modules" in submitted or "py_modules" in runtime_env:
        logger.info("user code %s: not added to py_modules, which the job sets itself", modules)
        return runtime_env
    logger.info("shipping user code to every node (runtime_env py_modules): %s", modules)
    return {**runtime_env, "py_modules": modules}
