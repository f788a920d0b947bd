"""Run storage helpers against a real S3-compatible server (moto on loopback): uploads and downloads
through node-local dirs, and storage that cannot be used failing in one line that names the URI."""

from __future__ import annotations

import importlib.util
import os

import pytest

from base import storage
from base.storage import StorageError
from orchestrator.cli import main


def test_staged_write_uploads_and_local_copy_downloads(s3_bucket, tmp_path):
    uri = storage.join(s3_bucket, "runs", "r", "model")
    with storage.staged_write(uri) as local:
        assert not local.startswith(str(tmp_path)) and os.path.isdir(local)
        os.makedirs(os.path.join(local, "sub"))
        for rel, data in (("a.bin", os.urandom(3000)), ("sub/b.json", b"{}")):
            with open(os.path.join(local, rel), "wb") as f:
                f.write(data)
    assert not os.path.exists(local)  # the node-local copy is gone once uploaded
    assert storage.children(uri) == ["a.bin", "sub"]
    with storage.local_copy(uri) as copy:
        assert sorted(os.listdir(copy)) == ["a.bin", "sub"]
        assert open(os.path.join(copy, "sub", "b.json"), "rb").read() == b"{}"
        assert os.path.getsize(os.path.join(copy, "a.bin")) == 3000
    assert not os.path.exists(copy)


def test_a_failed_staged_write_uploads_nothing(s3_bucket):
    uri = storage.join(s3_bucket, "half")
    with pytest.raises(RuntimeError, match="crash"), storage.staged_write(uri) as local:
        open(os.path.join(local, "shard.pt"), "wb").write(b"x")
        raise RuntimeError("crash")
    assert storage.children(uri) == []


def test_local_paths_are_used_in_place(tmp_path):
    uri = str(tmp_path / "run" / "model")
    with storage.staged_write(uri) as local:
        assert local == uri
        open(os.path.join(local, "f"), "w").write("x")
    with storage.local_copy(uri) as local:
        assert local == uri and os.listdir(local) == ["f"]


def test_probe_leaves_nothing_behind(s3_bucket):
    storage.check_writable(storage.join(s3_bucket, "runs"))
    assert storage.children(s3_bucket) == []


def _assert_one_line(e: pytest.ExceptionInfo, uri: str, *words: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and repr(uri) in msg, msg
    for w in words:
        assert w in msg, msg


def test_a_missing_bucket_is_a_one_line_error(s3_bucket):
    uri = "s3://relayrl-no-such-bucket/runs"
    with pytest.raises(StorageError) as e:
        storage.check_writable(uri)
    _assert_one_line(e, uri, "bucket does not exist")


def test_missing_credentials_are_a_one_line_error(s3_bucket, monkeypatch):
    import s3fs

    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3fs.S3FileSystem.clear_instance_cache()
    uri = storage.join(s3_bucket, "runs")
    with pytest.raises(StorageError) as e:
        storage.check_writable(uri)
    _assert_one_line(e, uri, "NoCredentialsError")


def test_an_unknown_scheme_is_a_one_line_error():
    with pytest.raises(StorageError) as e:
        storage.check_writable("nosuch://bucket/runs")
    _assert_one_line(e, "nosuch://bucket/runs", "Protocol not known")


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_a_scheme_without_its_package_names_the_package():
    with pytest.raises(StorageError) as e:
        storage.check_writable("gs://bucket/runs")
    _assert_one_line(e, "gs://bucket/runs", "gcsfs")


def test_train_on_a_missing_bucket_fails_before_anything_starts(s3_bucket, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('num_steps = 1\n[data]\ntrain_size = 8\neval_size = 0\n')
    rc = main(["train", str(cfg), "output_dir=s3://relayrl-no-such-bucket/runs", "model.path=/nonexistent"])
    err = capsys.readouterr().err.strip()
    # the storage error comes first: before the model is resolved (it does not exist) or Ray starts
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "'s3://relayrl-no-such-bucket/runs'" in err and "bucket does not exist" in err, err
