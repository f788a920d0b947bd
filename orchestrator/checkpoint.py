"""Run checkpoints that are complete or ignored: layout, atomic commit, retention, lookup, compatibility.

A checkpoint is a directory ``<run_dir>/checkpoints/step_<NNNNNN>/`` holding the learner's DeepSpeed
state (``learner/``), the buffer (``buffer.pkl``), the driver's state (``trainer.json``: policy
version, counters, prompt-sampler state, in-flight requests, the resolved config) and, written last,
a ``COMPLETE`` marker. It is assembled under a hidden ``.step_<N>.tmp`` name and renamed into place,
so a crash mid-write leaves either nothing or a ``.tmp`` dir that lookups ignore (and the next write
removes).

Left out on purpose: what goes into the files (`orchestrator.loop.Trainer.state_dict` decides), remote
storage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"

# Config fields a resumed run must share with the checkpoint: they change what the saved state means.
RESUME_INVARIANT_FIELDS = (
    "seed", "prompts_per_step", "model.path", "data.type", "data.task", "data.task_config", "data.path",
    "data.train_size", "data.train_seed", "data.prompt_field", "data.answer_field", "data.one_shot",
    "data.instruction", "rollout.group_size", "learner.num_learners", "learner.zero_stage", "learner.dtype",
    "learner.lora",
    "buffer.prompt_sampler", "buffer.dynamic_sampling", "buffer.value_tracker", "buffer.rollout_allocation",
)


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp`` and marker-less dirs are ignored)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / COMPLETE).is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None."""
    done = complete_checkpoints(run_dir)
    return done[-1] if done else None


def find_run_to_resume(output_dir: str | Path, name: str) -> Path | None:
    """The most recently modified ``<output_dir>/<name>-*`` run dir that has a complete checkpoint."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    runs = [p for p in root.glob(f"{name}-*") if p.is_dir() and latest_checkpoint(p) is not None]
    return max(runs, key=lambda p: latest_checkpoint(p).stat().st_mtime) if runs else None


def begin(run_dir: Path, step: int) -> Path:
    """A fresh temporary directory for the checkpoint of ``step`` (a stale one from a crash is removed)."""
    tmp = checkpoints_dir(run_dir) / f".step_{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, keep: int, info: dict[str, Any]) -> Path:
    """Mark ``tmp`` complete, rename it to ``step_<step>`` and delete all but the newest ``keep``.

    Raises:
        FileExistsError: a complete checkpoint of this step already exists.
    """
    final = tmp.parent / f"step_{step:06d}"
    if final.exists():
        raise FileExistsError(f"checkpoint {final} already exists")
    marker = tmp / COMPLETE
    with open(marker, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, final)
    for old in complete_checkpoints(tmp.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint written: %s", final)
    return final


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def incompatible_fields(saved: dict, current: dict) -> list[str]:
    """``"field: saved -> current"`` for each `RESUME_INVARIANT_FIELDS` entry that differs."""
    return [f"{k}: {_get(saved, k)!r} -> {_get(current, k)!r}"
            for k in RESUME_INVARIANT_FIELDS if _get(saved, k) != _get(current, k)]


# ---- what a Trainer writes and reads ---------------------------------------------------------------

def save(trainer) -> Path:
    """Write a complete checkpoint of ``trainer`` at its current policy version; returns its dir.

    Holds: learner (DeepSpeed model, optimizer, scheduler, RNG per rank), buffer contents and curation
    state (``buffer.pkl``) and `Trainer.state_dict` (``trainer.json``: admission counters, rollout
    totals, prompt sampler, requests in flight, the resolved config).

    Raises:
        TimeoutError: the learner or the buffer did not answer in time.
    """
    import pickle
    import time

    import ray

    tmp = begin(trainer.run_dir, trainer.version)
    t0 = time.perf_counter()
    trainer.learner.save_checkpoint(str(tmp / "learner"))
    buffer_state = ray.get(trainer.buffer.state_dict.remote(), timeout=300)
    with open(tmp / "buffer.pkl", "wb") as f:
        pickle.dump(buffer_state, f)
    (tmp / "trainer.json").write_text(json.dumps(trainer.state_dict()))
    return commit(tmp, trainer.version, trainer.cfg.checkpoint.keep,
                  {"step": trainer.version, "seconds": time.perf_counter() - t0})


def restore(trainer, ckpt: Path) -> dict[str, float]:
    """Load ``ckpt`` into a freshly built ``trainer`` and bring every rollout worker to its weights.

    In-flight requests of the checkpoint are queued for re-issue minus the groups that had already
    reached the buffer or been trained, so none is lost or duplicated (`Trainer.load_state_dict`).
    Returns ``{"resume/step", "resume/reissued_groups", "resume/seconds"}``.

    Raises:
        ValueError: the current config changes a field in `RESUME_INVARIANT_FIELDS` (all named).
        FileNotFoundError: the checkpoint is incomplete.
        TimeoutError: the learner, buffer or weight push did not answer in time.
    """
    import pickle
    import time

    import ray

    t0 = time.perf_counter()
    ckpt = Path(ckpt)
    if not (ckpt / COMPLETE).is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} is incomplete (no {COMPLETE} marker)")
    state = json.loads((ckpt / "trainer.json").read_text())
    bad = incompatible_fields(state["config"], trainer.cfg.model_dump(mode="json"))
    if bad:
        raise ValueError(f"cannot resume from {ckpt}: the config changes fields the checkpoint depends on: "
                         + "; ".join(bad))
    trainer.learner.load_checkpoint(str(ckpt / "learner"))
    with open(ckpt / "buffer.pkl", "rb") as f:
        buffer_state = pickle.load(f)
    ray.get(trainer.buffer.load_state_dict.remote(buffer_state), timeout=300)
    done = {g[0].group_id for g in buffer_state["groups"]} | set(buffer_state["taken_ids"])
    reissued = trainer.load_state_dict(state, done)
    trainer.weight_sync.push_everywhere(trainer.version)
    logger.info("resumed from %s: policy version %d, %d in-flight groups to re-issue", ckpt, trainer.version, reissued)
    return {"resume/step": float(trainer.version), "resume/reissued_groups": float(reissued),
            "resume/seconds": time.perf_counter() - t0}
