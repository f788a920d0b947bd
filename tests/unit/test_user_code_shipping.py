"""User code named by import path is shipped to every node: `base.user_code.user_modules` finds the files and
package dirs the driver imported it from, and `ship_user_code` puts them in the job's runtime_env ``py_modules``
(the two-node run in tests/integration/test_two_nodes.py checks a worker on a node without the driver's files
imports it)."""

from __future__ import annotations

import json
import uuid

import pytest

from base import user_code
from base.user_code import code_roots, import_object, ship_user_code, user_modules


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A dir on sys.path holding a plain module and a package, uniquely named; a fresh import record."""
    tag = uuid.uuid4().hex[:8]
    (tmp_path / f"rewards_{tag}.py").write_text("def fn(prompts, completions, **kw):\n    return [0.0]\n")
    (tmp_path / f"pkg_{tag}" / "sub").mkdir(parents=True)
    (tmp_path / f"pkg_{tag}" / "__init__.py").write_text("")
    (tmp_path / f"pkg_{tag}" / "sub" / "__init__.py").write_text("")
    (tmp_path / f"pkg_{tag}" / "sub" / "envs.py").write_text("class Env:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(user_code, "_IMPORTED", {})
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    return tmp_path, tag


def test_the_modules_the_driver_imported_are_shipped_as_py_modules(user_dir):
    root, tag = user_dir
    paths = [f"rewards_{tag}:fn", f"pkg_{tag}.sub.envs:Env", "json:dumps", "exact_match"]
    for path in paths[:3]:
        import_object(path, "rollout.rewards[0].fn")
    # the module's file and the top-level package's dir; the standard library's json is on every node
    assert user_modules() == [str((root / f"rewards_{tag}.py").resolve()), str((root / f"pkg_{tag}").resolve())]
    assert code_roots(paths) == [str(root.resolve())]
    env = ship_user_code({"worker_process_setup_hook": "x"})
    assert env == {"worker_process_setup_hook": "x", "py_modules": user_modules()}


def test_nothing_is_added_without_user_code_or_when_the_job_ships_its_own(user_dir, monkeypatch):
    root, tag = user_dir
    assert ship_user_code({"a": 1}) == {"a": 1}  # nothing imported
    import_object(f"rewards_{tag}:fn", "rollout.rewards[0].fn")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR",
                       json.dumps({"runtime_env": {"py_modules": ["s3://bucket/mine.zip"]}}))
    assert ship_user_code({"a": 1}) == {"a": 1}  # Ray refuses the same field from the job and from ray.init
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "/x"}}))
    assert ship_user_code({"a": 1})["py_modules"] == [str((root / f"rewards_{tag}.py").resolve())]
