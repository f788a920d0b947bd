"""Run storage through fsspec: a local path, a shared filesystem, or an object store (``s3://``, ``gs://``, ...).

The driver and the learner ranks both write run outputs (checkpoints, the final model), so the helpers
live here, below both. A URI is a plain string: a local path (``runs``, ``/mnt/shared/runs``) or a URL
whose scheme fsspec knows (``s3://bucket/prefix`` needs ``s3fs``, ``gs://`` needs ``gcsfs``). Writers on
object stores work in a node-local temporary dir and upload it (`staged_write`); readers download into
one (`local_copy`), or fetch only the files they need into a dir the processes of a node share
(`fetch_files`); on a local path both use the path itself.

Credentials and endpoints come only from the environment or the platform's identity, as the storage
library reads them (for S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` or an
instance role, ``AWS_ENDPOINT_URL`` for an S3-compatible server, ``AWS_DEFAULT_REGION``); nothing here
takes or records them.

Left out on purpose: what a checkpoint holds and when it counts as complete (`orchestrator.checkpoint`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

logger = logging.getLogger(__name__)


class StorageError(ValueError):
    """A storage URI that cannot be opened or written; the one-line message names the URI and the cause."""


def filesystem(uri: str):
    """``(fsspec filesystem, path within it)`` of ``uri``.

    Raises:
        StorageError: fsspec does not know the scheme, or its package is not installed.
    """
    import fsspec

    try:
        return fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:
        raise StorageError(f"storage {uri!r} cannot be opened: {_one_line(e)}") from None


def is_remote(uri: str) -> bool:
    """Whether ``uri`` names anything but a local (or locally mounted) path."""
    from fsspec.utils import get_protocol

    return get_protocol(str(uri)) not in ("file", "local")


def local_path(uri: str) -> str:
    """The filesystem path of a local ``uri`` (a ``file://`` prefix dropped)."""
    assert not is_remote(uri), uri
    return filesystem(str(uri))[1]


def join(uri: str, *parts: str) -> str:
    """``uri/part/...`` for local paths and URLs alike."""
    return "/".join([str(uri).rstrip("/"), *(p.strip("/") for p in parts)])


def basename(uri: str) -> str:
    """The last component of ``uri``."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def exists(uri: str) -> bool:
    """Whether an object or file exists at ``uri`` (no cached listing)."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    return fs.exists(path)


def children(uri: str) -> list[str]:
    """Names (not paths) of the entries right under ``uri``, sorted; ``[]`` if there is none."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    try:
        return sorted(basename(p) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def files_under(uri: str) -> list[str]:
    """Paths, relative to ``uri`` and ``/``-separated, of every file or object under it (at any depth), sorted;
    ``[]`` if there is none (no cached listing)."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    root = path.rstrip("/") + "/"
    return sorted(p[len(root):] for p in fs.find(path) if p.startswith(root))


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` as the object or file ``uri`` (parents created on local paths)."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def read_bytes(uri: str) -> bytes:
    """The contents of the object or file ``uri``."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def remove(uri: str) -> None:
    """Delete ``uri`` and everything under it; nothing if it does not exist."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def upload_dir(local_dir: str, uri: str) -> int:
    """Copy every file under ``local_dir`` to the same relative path under ``uri``; returns the bytes sent."""
    fs, path = filesystem(uri)
    sent = 0
    for root, _, files in os.walk(local_dir):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            fs.put_file(src, join(path, rel))
            sent += os.path.getsize(src)
    return sent


def download_dir(uri: str, local_dir: str, skip: tuple[str, ...] = ()) -> int:
    """Copy every object under ``uri`` (except those whose relative path starts with one of ``skip``) to
    ``local_dir``; returns the bytes received."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path)
    received = 0
    for src in fs.find(path):
        rel = src[len(path.rstrip("/")) + 1:]
        if rel.startswith(skip):
            continue
        dst = os.path.join(local_dir, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        fs.get_file(src, dst)
        received += os.path.getsize(dst)
    return received


def fetch_files(uri: str, names: list[str], local_dir: str, timeout_s: float) -> tuple[list[str], int]:
    """Copy the objects ``uri/<name>`` for each of ``names`` (relative paths, ``/``-separated) to
    ``local_dir/<name>``, skipping those already there: processes sharing ``local_dir`` (the ranks of one
    node) fetch each file once. Each file is fetched under its own lock (``<file>.lock``, `filelock`) into a
    temporary name and renamed, so a file present in ``local_dir`` is complete.

    Returns:
        ``(names this call fetched, their bytes)``; the other names were already in ``local_dir``.

    Raises:
        TimeoutError: another process held a file's lock (it was fetching that file) for over ``timeout_s``.
        FileNotFoundError: an object is missing under ``uri``.
    """
    from filelock import FileLock, Timeout

    fs, path = filesystem(uri)
    fetched, received = [], 0
    for name in names:
        dst = os.path.join(local_dir, *name.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            with FileLock(dst + ".lock", timeout=timeout_s):
                if os.path.isfile(dst):  # another process of this node fetched it
                    continue
                tmp = f"{dst}.part-{uuid.uuid4().hex[:8]}"
                try:
                    fs.get_file(join(path, name), tmp)
                    os.replace(tmp, dst)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
        except Timeout:
            raise TimeoutError(f"waited {timeout_s:.0f} s for another process's download of {join(uri, name)} "
                               f"to {dst}") from None
        fetched.append(name)
        received += os.path.getsize(dst)
    return fetched, received


@contextlib.contextmanager
def staged_write(uri: str) -> Iterator[str]:
    """A local dir whose contents end up under ``uri``: the path itself when local, else a node-local
    temporary dir uploaded when the block ends without an error (and removed either way)."""
    if not is_remote(uri):
        os.makedirs(local_path(uri), exist_ok=True)
        yield local_path(uri)
        return
    tmp = tempfile.mkdtemp(prefix="relayrl-upload-")
    try:
        yield tmp
        n = upload_dir(tmp, uri)
        logger.info("uploaded %.1f MB to %s", n / 2**20, uri)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local dir holding what is under ``uri``: the path itself when local, else a node-local
    temporary download (removed when the block ends)."""
    if not is_remote(uri):
        yield local_path(uri)
        return
    tmp = tempfile.mkdtemp(prefix="relayrl-download-")
    try:
        n = download_dir(uri, tmp)
        logger.info("downloaded %.1f MB from %s", n / 2**20, uri)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_writable(uri: str) -> None:
    """Write and delete a probe object under ``uri``, so that a bad scheme, missing credentials or a
    missing bucket fail here, in one line, before anything starts.

    Raises:
        StorageError: names ``uri`` and the cause.
    """
    filesystem(uri)  # an unknown scheme or a missing package fails here, naming ``uri``
    probe = join(uri, f".relayrl-probe-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"")
        remove(probe)
    except Exception as e:  # noqa: BLE001 - each client has its own errors (OSError, botocore's, gcsfs'...)
        raise StorageError(f"storage {uri!r} is not writable: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or "(no message)"
    return f"{type(e).__name__}: {text}"
