"""`base.model_source`: the model by content, copied to a node that cannot see the driver's dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from base import storage
from base.model_source import ModelFileServer, ModelSource, content_digest, list_files, local_model_dir


def _model(d: Path, weights: bytes = b"w" * 1000) -> Path:
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(weights)
    (d / "sub" / "tokenizer.json").write_text("tok")
    (d / ".cache").mkdir()
    (d / ".cache" / "lock").write_text("x")  # hidden: not part of the model
    return d


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RELAYRL_CACHE", str(tmp_path / "cache"))


def _source(d: Path, **kw) -> ModelSource:
    files = list_files(d)
    return ModelSource(str(d), content_digest(d, files), tuple(files), **kw)


def test_listing_and_digest_follow_content_not_hidden_files(tmp_path):
    a, b = _model(tmp_path / "a"), _model(tmp_path / "b")
    assert [n for n, _ in list_files(a)] == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert content_digest(a) == content_digest(b)  # same content, other path
    (b / ".cache" / "lock").write_text("changed")
    assert content_digest(a) == content_digest(b)
    (b / "model.safetensors").write_bytes(b"v" * 1000)  # same size, other bytes
    os.utime(b / "model.safetensors", ns=(1, 1))  # a new version of the dir: the remembered digest is not reused
    assert content_digest(a) != content_digest(b)


def test_a_dir_this_node_sees_is_used_in_place(tmp_path):
    d = _model(tmp_path / "m")
    assert _source(d).local_dir() == str(d)
    assert local_model_dir(str(d)) == str(d)
    with pytest.raises(FileNotFoundError, match="does not exist on this node"):
        local_model_dir(str(tmp_path / "missing"))


def test_a_node_without_the_dir_copies_it_once_from_the_uri(tmp_path):
    src = _model(tmp_path / "on_storage")
    source = _source(src, uri=f"file://{src}")
    # as another node sees it: the driver's path is not there
    moved = ModelSource(str(tmp_path / "driver_only"), source.digest, source.files, uri=source.uri)
    got = Path(moved.local_dir())
    assert got.parent.name == "by-digest" and got.name == source.digest
    assert list_files(got) == list(source.files) and content_digest(got) == source.digest
    (src / "model.safetensors").write_bytes(b"x")  # the copy is found by content: no second read
    assert moved.local_dir() == str(got)


def test_a_copy_that_differs_from_the_runs_model_is_refused(tmp_path):
    src = _model(tmp_path / "on_storage")
    source = _source(src, uri=f"file://{src}")
    (src / "model.safetensors").write_bytes(b"v" * 1000)  # changed after the run started
    moved = ModelSource(str(tmp_path / "driver_only"), source.digest, source.files, uri=source.uri)
    with pytest.raises(RuntimeError, match="the model changed during the run"):
        moved.local_dir()
    assert not (tmp_path / "cache" / "models" / "by-digest" / source.digest).exists()  # nothing half-made kept


def test_without_a_way_to_copy_the_error_names_the_dir_and_the_fix(tmp_path):
    moved = ModelSource(str(tmp_path / "driver_only"), "0" * 64, (("config.json", 2),))
    with pytest.raises(FileNotFoundError, match=r"driver_only.*model.path = 's3://"):
        moved.local_dir()


def test_the_file_server_serves_only_the_models_files(tmp_path):
    d = _model(tmp_path / "m", weights=bytes(range(256)) * 4)
    server = ModelFileServer(str(d), list_files(d))
    assert server.read("model.safetensors", 250, 10) == (bytes(range(256)) * 4)[250:260]
    with pytest.raises(ValueError, match="not a file of the model"):
        server.read("../m/config.json", 0, 10)


def test_a_model_on_s3_is_copied_once_and_found_again_by_its_listing(s3_bucket, tmp_path):
    from orchestrator.models import resolve_model_path

    src = _model(tmp_path / "src")
    uri = storage.join(s3_bucket, "models", "m")
    storage.upload_dir(str(src), uri)
    got = resolve_model_path(uri)
    assert Path(got).parent.name == "by-digest" and content_digest(got) == content_digest(src)
    assert resolve_model_path(uri) == got
    storage.remove(storage.join(uri, "sub"))  # a changed listing: a new copy, not the old one
    assert resolve_model_path(uri) != got
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_path(storage.join(s3_bucket, "models", "nothing"))
