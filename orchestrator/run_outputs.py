"""A run's outputs seen from the driver: the run's storage URI and the local dir the driver writes in.

``output_dir`` is a local path, a shared filesystem path or an object-store URI (``s3://bucket/runs``,
`base.storage`). With a local path the run dir is written in place and nothing is copied. With an
object store the driver writes its files (``metrics.jsonl``, ``trained_groups.jsonl``,
``tensorboard/``, ``summary.json``) into a node-local staging dir and uploads them at each checkpoint
(before the checkpoint's marker) and at the end; a resumed run downloads them first, so its curves
continue on a machine that never saw the run. Checkpoints and the final model do not pass through the
driver: the learner ranks write their parts to storage themselves.

Left out on purpose: checkpoint layout and completeness (`orchestrator.checkpoint`), the storage
client itself (`base.storage`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from base import storage

logger = logging.getLogger(__name__)

# written to storage by others (the learner ranks), never staged on the driver
NOT_STAGED = ("checkpoints/", "final_model/")


def staging_dir(run_uri: str) -> Path:
    """The driver's node-local dir for a run on an object store (one per run URI; named as the run, which
    the W&B run id and the control actor's name are)."""
    digest = hashlib.sha1(run_uri.encode()).hexdigest()[:8]
    return Path(tempfile.gettempdir()) / "relayrl-staging" / digest / storage.basename(run_uri)


def logs_dir_of(run_uri: str) -> Path:
    """Where the driver writes the components' full logs: ``<run>/logs`` for a local run, else a driver-local
    dir named after the run (logs stay on the driver's node; they are not uploaded)."""
    if not storage.is_remote(str(run_uri)):
        return Path(storage.local_path(str(run_uri))) / "logs"
    return Path(tempfile.gettempdir()) / "relayrl-logs" / storage.basename(str(run_uri))


def create_run(output_dir: str, name: str, config: dict) -> str:
    """Start a fresh run ``<output_dir>/<name>-<timestamp>`` holding ``config.json``; returns its URI.

    Raises:
        FileExistsError: that run already exists.
    """
    run = storage.join(output_dir, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if storage.children(run):
        raise FileExistsError(f"run dir {run} already exists")
    storage.write_bytes(storage.join(run, "config.json"), json.dumps(config, indent=2).encode())
    return run


class RunOutputs:
    """The run at ``uri`` and its local dir (``local_dir``): the run dir itself for a local ``uri``,
    else a fresh staging dir, filled from storage when ``resume`` is set."""

    def __init__(self, uri: str, resume: bool = False) -> None:
        self.uri, self.remote = str(uri), storage.is_remote(str(uri))
        if not self.remote:
            self.local_dir = Path(storage.local_path(self.uri))
            return
        self.local_dir = staging_dir(self.uri)
        shutil.rmtree(self.local_dir, ignore_errors=True)  # what a previous attempt left is stale
        self.local_dir.mkdir(parents=True)
        if resume:
            n = storage.download_dir(self.uri, str(self.local_dir), skip=NOT_STAGED)
            logger.info("run %s: %.1f kB of metrics copied to %s", self.uri, n / 1024, self.local_dir)

    @property
    def name(self) -> str:
        """The run's name (its dir's last component)."""
        return storage.basename(self.uri)

    def push(self) -> None:
        """Upload the staging dir's files to the run's storage (nothing for a local run)."""
        if self.remote:
            storage.upload_dir(str(self.local_dir), self.uri)
