"""The run's model on every node that needs it: `ModelSource`, built once by the driver, turned into a
local HF model dir by each actor on its own node (`local_model_dir`).

On a cluster without a shared filesystem the driver's model dir (the converted built-in model, a local
dir, a hub snapshot in the driver's cache) does not exist on the other nodes. So the driver describes
the model by content: its file names, sizes and a SHA-256 digest over them (`content_digest`). An actor
then uses, in this order:

1. the driver's path, if it exists on the actor's node with the same content (one shared filesystem,
   or a single machine: nothing is copied);
2. ``<cache>/models/by-digest/<digest>``, a copy made earlier on this node by any actor of any run;
3. a new copy in that folder, read from the storage URI the model came from (``model.path =
   "s3://..."``; each node reads it itself), else from the driver's node through `ModelFileServer`, an
   actor pinned there that serves the files in chunks over Ray's object store.

A copy is written under a temporary name, its digest checked, then renamed: a half-written copy is
never used, and a lock file makes the actors of one node copy it once. ``<cache>`` is
``$RELAYRL_CACHE`` or ``~/.cache/relayrl`` on each node.

Left out on purpose: pruning old copies from the cache, and fetching hub models per node (a hub
snapshot reaches the other nodes from the driver, like a local dir).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 << 20  # bytes per `ModelFileServer.read` call
HASH_BLOCK = 16 << 20


def cache_dir() -> Path:
    """This node's folder for model copies and digests (``$RELAYRL_CACHE`` or ``~/.cache/relayrl``)."""
    return Path(os.environ.get("RELAYRL_CACHE", Path.home() / ".cache" / "relayrl"))


def list_files(model_dir: str | Path) -> list[tuple[str, int]]:
    """``(relative name, size in bytes)`` of every file under ``model_dir``, sorted; hidden files and
    folders (a name starting with ``.``) left out. Symlinks (hub snapshots) are followed."""
    root = Path(model_dir)
    out = []
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            out.append((rel.as_posix(), p.stat().st_size))
    return sorted(out)


def content_digest(model_dir: str | Path, files: list[tuple[str, int]] | None = None, memo: bool = True) -> str:
    """SHA-256 (hex) over every file's name, size and bytes, in name order.

    With ``memo``, computed once per version of a dir: the result is kept in ``<cache>/digests/`` keyed by
    the dir's path, file sizes and modification times, so a later run on the same node reads it back
    (hashing reads every byte).
    """
    root = Path(model_dir).resolve()
    files = list_files(root) if files is None else files
    stamp = [[n, s, (root / n).stat().st_mtime_ns] for n, s in files]
    memo_file = cache_dir() / "digests" / (hashlib.sha256(str(root).encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(memo_file.read_text()) if memo else {}
        if saved.get("files") == stamp:
            return saved["digest"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for name, size in files:
        h.update(f"{name}\0{size}\0".encode())
        with open(root / name, "rb") as f:
            while block := f.read(HASH_BLOCK):
                h.update(block)
    digest = h.hexdigest()
    if not memo:
        return digest
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"files": stamp, "digest": digest}))
        os.replace(tmp, memo_file)
    except OSError as e:  # a read-only cache only costs a re-hash next time
        logger.debug("could not keep the digest of %s: %s", root, e)
    return digest


class ModelFileServer:
    """Serves one model dir's files in chunks; runs as an actor pinned to the driver's node.

    Args:
        model_dir: the model dir on this node.
        files: the names it may serve, with sizes (`list_files`); any other name is refused.
    """

    def __init__(self, model_dir: str, files: list[tuple[str, int]]) -> None:
        self.root, self.sizes = Path(model_dir), dict(files)

    def read(self, name: str, offset: int, length: int) -> bytes:
        """``length`` bytes of file ``name`` from byte ``offset`` (fewer at the end of the file).

        Raises:
            ValueError: ``name`` is not one of the model's files.
        """
        if name not in self.sizes:
            raise ValueError(f"{name!r} is not a file of the model at {self.root}")
        with open(self.root / name, "rb") as f:
            f.seek(offset)
            return f.read(length)


@dataclass(frozen=True)
class ModelSource:
    """The run's model as every actor can get it (see the module docstring for the order tried).

    Attributes:
        path: the model dir on the driver's node.
        digest: `content_digest` of it.
        files: ``(relative name, size in bytes)`` of its files.
        uri: the storage URI it was read from (``model.path = "s3://..."``), or None.
        server: the name of a `ModelFileServer` actor on the driver's node (looked up with
            ``ray.get_actor``: a name, not a handle, so the constructor arguments of restartable actors hold
            no actor handle, which Ray flags at creation), or None (then a node without the files and
            without ``uri`` cannot get them).
    """

    path: str
    digest: str
    files: tuple[tuple[str, int], ...]
    uri: str | None = None
    server: str | None = None

    @property
    def nbytes(self) -> int:
        """Total size of the model's files, in bytes."""
        return sum(s for _, s in self.files)

    def local_dir(self, timeout_s: float = 1800.0) -> str:
        """A dir with this model's files on the calling process's node (see the module docstring).

        Args:
            timeout_s: bound on waiting for another actor's copy (the lock) and on each chunk read.

        Raises:
            FileNotFoundError: the model is not on this node, and neither ``uri`` nor ``server`` is set.
            RuntimeError: a copy's digest differs from ``digest`` (the source changed during the run).
            TimeoutError: the lock or a chunk read took longer than ``timeout_s``.
        """
        if _same_content(self.path, self.files, self.digest):
            return self.path
        dest = cache_dir() / "models" / "by-digest" / self.digest
        if (dest / ".complete").is_file():
            return str(dest)
        if self.uri is None and self.server is None:
            raise FileNotFoundError(f"model dir {self.path!r} does not exist on this node and the run gave no "
                                    "way to copy it here; put the model on a storage URI (model.path = 's3://...')")
        from filelock import FileLock, Timeout

        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(dest) + ".lock", timeout=timeout_s):
                if not (dest / ".complete").is_file():  # another actor of this node may have made it meanwhile
                    self._copy_to(dest, timeout_s)
        except Timeout:
            raise TimeoutError(f"waited {timeout_s:.0f} s for another process's copy of the model to {dest}") from None
        return str(dest)

    def _copy_to(self, dest: Path, timeout_s: float) -> None:
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.digest[:12]}-", dir=dest.parent))
        try:
            for name, size in self.files:
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                if self.uri is not None:
                    from base import storage

                    fs, path = storage.filesystem(storage.join(self.uri, name))
                    fs.get_file(path, str(tmp / name))
                else:
                    self._fetch_from_server(name, size, tmp / name, timeout_s)
            got = content_digest(tmp, list(self.files), memo=False)
            if got != self.digest:
                raise RuntimeError(f"the copy of model {self.uri or self.path!r} has digest {got[:12]}, the run "
                                   f"started with {self.digest[:12]}: the model changed during the run")
            install_copy(tmp, self.digest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("copied model %s (%.1f MB) to %s from %s in %.1f s", self.digest[:12], self.nbytes / 1e6, dest,
                    self.uri or "the driver's node", time.monotonic() - t0)

    def _fetch_from_server(self, name: str, size: int, out: Path, timeout_s: float) -> None:
        import ray

        server = ray.get_actor(self.server)
        with open(out, "wb") as f:
            pending = [server.read.remote(name, off, CHUNK_BYTES) for off in range(0, size, CHUNK_BYTES)[:2]]
            offsets = list(range(0, size, CHUNK_BYTES))[2:]
            while pending:  # two chunks in flight: the next transfer overlaps this write
                ready, _ = ray.wait(pending[:1], timeout=timeout_s)
                if not ready:
                    raise TimeoutError(f"reading {name!r} of the model from the driver's node took over {timeout_s:.0f} s")
                f.write(ray.get(pending.pop(0)))
                if offsets:
                    pending.append(server.read.remote(name, offsets.pop(0), CHUNK_BYTES))


def install_copy(tmp_dir: str | Path, digest: str) -> Path:
    """Move the checked copy ``tmp_dir`` (on the cache's filesystem) to ``<cache>/models/by-digest/<digest>``,
    marked complete; returns that path. A copy already there is kept and ``tmp_dir`` dropped."""
    dest = cache_dir() / "models" / "by-digest" / digest
    if (dest / ".complete").is_file():
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    Path(tmp_dir, ".complete").write_text(digest)
    shutil.rmtree(dest, ignore_errors=True)  # an unmarked leftover of a crashed copy
    os.replace(tmp_dir, dest)
    return dest


def _same_content(path: str, files: tuple[tuple[str, int], ...], digest: str) -> bool:
    """Whether ``path`` is a dir on this node holding exactly ``files`` with ``digest``."""
    if not os.path.isdir(path):
        return False
    listed = list_files(path)
    return listed == list(files) and content_digest(path, listed) == digest


def local_model_dir(model: ModelSource | str) -> str:
    """The local dir of ``model``: a `ModelSource` is resolved on this node; a str is a dir already.

    Raises:
        FileNotFoundError: a str that is not a dir on this node (the message names it), or as in
            `ModelSource.local_dir`.
    """
    if isinstance(model, ModelSource):
        return model.local_dir()
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model dir {model!r} does not exist on this node")
    return model
