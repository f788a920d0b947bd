"""Run checkpoints that are complete or ignored: layout, atomic commit, retention, lookup, compatibility.

A run lives at a storage URI (`base.storage`: a local path, a shared filesystem, or an object store
such as ``s3://bucket/runs/<run>``). A checkpoint is ``<run>/checkpoints/step_<NNNNNN>/`` holding the
learner's DeepSpeed state (``learner/``: each learner rank writes its own shards and RNG state, from
its own node), the buffer (``buffer.pkl``), the driver's state (``trainer.json``: policy version,
counters, prompt-sampler state, in-flight requests, the resolved config) and, written last, a
``COMPLETE`` marker. Lookups only ever pick checkpoints that have the marker.

On a local path the checkpoint is assembled under a hidden ``.step_<N>.tmp`` name and renamed into
place after the marker is written, so a crash leaves either nothing or a ``.tmp`` dir that lookups
ignore (and the next write removes). Object stores have no atomic rename (a "rename" is a copy of
every object, which can itself be interrupted), so there the step's own prefix is the temporary one
until its marker exists: the marker object is the commit, and a marker-less prefix left by a crash is
ignored and replaced by the next write of that step.

`save` and `restore` are handed the parts they write and read (learner group, buffer actor, the driver's
state or its loader, weight sync) and use their public methods only. Left out on purpose: what goes
into the files (each part's `state_dict` decides; ``trainer.json`` is `orchestrator.loop.Trainer.state_dict`).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from base import storage

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
_STEP = re.compile(r"step_\d+")

# Config fields a resumed run must share with the checkpoint: they change what the saved state means.
RESUME_INVARIANT_FIELDS = (
    "seed", "prompts_per_step", "model.path", "data.type", "data.task", "data.task_config", "data.path",
    "data.train_size", "data.train_seed", "data.prompt_field", "data.answer_field", "data.one_shot",
    "data.instruction", "data.split", "data.eval_fraction", "data.eval_seed", "data.system_prompt", "data.template",
    "rollout.group_size", "learner.num_learners", "learner.zero_stage", "learner.dtype",
    "learner.lora",
    "buffer.prompt_sampler", "buffer.dynamic_sampling", "buffer.value_tracker", "buffer.rollout_allocation",
)


def checkpoints_dir(run: str | Path) -> str:
    """``<run>/checkpoints`` (a local path or URI, as ``run`` is)."""
    return storage.join(str(run), "checkpoints")


def complete_checkpoints(run: str | Path) -> list[str]:
    """Complete checkpoints of a run, oldest first (``.tmp`` and marker-less ones are ignored)."""
    root = checkpoints_dir(run)
    steps = [storage.join(root, n) for n in storage.children(root) if _STEP.fullmatch(n)]
    return [p for p in steps if storage.exists(storage.join(p, COMPLETE))]


def run_stops_for_dead_rank(run: str | Path, cause: str, no_checkpoint: str = "none") -> RuntimeError:
    """The error that stops a run whose learner lost a rank: ``cause`` (which rank died, during what),
    the last complete checkpoint of ``run`` (``no_checkpoint`` when there is none) and how to resume."""
    ckpt = latest_checkpoint(run)
    return RuntimeError(f"{cause}; the run stops. Last complete checkpoint: {ckpt or no_checkpoint}; continue with "
                        "`relayrl train CONFIG --resume`")


def latest_checkpoint(run: str | Path) -> str | None:
    """The newest complete checkpoint of ``run``, or None."""
    done = complete_checkpoints(run)
    return done[-1] if done else None


def _marker(ckpt: str) -> dict[str, Any]:
    """What `commit` wrote into the ``COMPLETE`` marker of ``ckpt`` (``step``, ``seconds``, ``time``)."""
    return json.loads(storage.read_bytes(storage.join(ckpt, COMPLETE)))


def _committed_at(ckpt: str) -> float:
    return _marker(ckpt).get("time", 0.0)


def find_run_to_resume(output_dir: str | Path, name: str) -> str | None:
    """The ``<output_dir>/<name>-*`` run whose newest complete checkpoint was committed last, or None."""
    runs = [storage.join(str(output_dir), n) for n in storage.children(str(output_dir))
            if n.startswith(f"{name}-")]
    latest = {r: c for r in runs if (c := latest_checkpoint(r)) is not None}
    return max(latest, key=lambda r: _committed_at(latest[r])) if latest else None


def begin(run: str | Path, step: int) -> str:
    """Where to assemble the checkpoint of ``step``: a fresh local ``.step_<N>.tmp`` dir (a stale one
    from a crash is removed), or on an object store the step's own prefix (a marker-less one from a
    crash is removed).

    Raises:
        FileExistsError: a complete checkpoint of this step already exists.
    """
    root = checkpoints_dir(run)
    final = storage.join(root, f"step_{step:06d}")
    if storage.exists(storage.join(final, COMPLETE)):
        raise FileExistsError(f"checkpoint {final} already exists")
    tmp = storage.join(root, f".step_{step:06d}.tmp") if not storage.is_remote(root) else final
    storage.remove(tmp)
    if not storage.is_remote(root):
        os.makedirs(storage.local_path(tmp))
    return tmp


def commit(tmp: str, step: int, keep: int, info: dict[str, Any]) -> str:
    """Write the ``COMPLETE`` marker into ``tmp`` (last), move a local ``tmp`` to ``step_<step>``,
    then delete all but the newest ``keep`` complete checkpoints. Returns the checkpoint's path.

    Raises:
        FileExistsError: a complete checkpoint of this step already exists.
    """
    root = tmp.rstrip("/").rsplit("/", 1)[0]
    final = storage.join(root, f"step_{step:06d}")
    marker = json.dumps({**info, "time": time.time()}).encode()
    if storage.is_remote(tmp):
        storage.write_bytes(storage.join(final, COMPLETE), marker)
    else:
        if os.path.exists(storage.local_path(final)):
            raise FileExistsError(f"checkpoint {final} already exists")
        with open(os.path.join(storage.local_path(tmp), COMPLETE), "wb") as f:
            f.write(marker)
            f.flush()
            os.fsync(f.fileno())
        os.rename(storage.local_path(tmp), storage.local_path(final))
    for old in complete_checkpoints(root.rstrip("/").rsplit("/", 1)[0])[:-keep]:
        storage.remove(storage.join(old, COMPLETE))  # first: a half-deleted checkpoint is never complete
        storage.remove(old)
    logger.info("checkpoint written: %s", final)
    return final


def check_visible(uri: str, names: list[str], what: str, run: str) -> None:
    """Raise if a file the learner ranks wrote under ``uri`` is not visible from the driver: a local
    ``output_dir`` on a cluster where a rank runs on another node without a shared filesystem.

    Raises:
        RuntimeError: one line naming the first missing file and the fix.
    """
    missing = [n for n in names if not storage.exists(storage.join(uri, n))]
    if missing:
        raise RuntimeError(
            f"a learner rank wrote {what} where the driver cannot see it ({storage.join(uri, missing[0])} is "
            f"missing): the run dir {run!r} is not shared by every node; set output_dir to a storage URI "
            "(s3://...) or a shared filesystem")


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def incompatible_fields(saved: dict, current: dict) -> list[str]:
    """``"field: saved -> current"`` for each `RESUME_INVARIANT_FIELDS` entry that differs; a field the saved
    config lacks (written before the field existed) is not compared."""
    def saved_has(dotted: str) -> bool:
        *parents, last = dotted.split(".")
        d = _get(saved, ".".join(parents)) if parents else saved
        return isinstance(d, dict) and last in d

    return [f"{k}: {_get(saved, k)!r} -> {_get(current, k)!r}"
            for k in RESUME_INVARIANT_FIELDS if saved_has(k) and _get(saved, k) != _get(current, k)]


# ---- what a Trainer writes and reads ---------------------------------------------------------------

def save(run: str, step: int, keep: int, *, learner, buffer, trainer_state: dict,
         sync_outputs: Callable[[], None]) -> str:
    """Write a complete checkpoint of policy version ``step`` into ``run`` (a local path or URI), keeping
    the newest ``keep``; returns its path.

    Holds: ``learner``'s state (a `learner.LearnerGroup`: DeepSpeed model, optimizer, scheduler, RNG per
    rank; each rank writes its own part to the run's storage), ``buffer``'s (the replay buffer actor's
    `state_dict`: contents and curation state, ``buffer.pkl``) and ``trainer_state`` (`Trainer.state_dict`,
    ``trainer.json``: admission counters, rollout totals, training clock, prompt sampler, requests in
    flight, the resolved config). ``sync_outputs`` runs before the marker is written (it copies the run's
    metrics to storage), so a complete checkpoint always has the metrics up to its step beside it.

    Raises:
        TimeoutError: the learner or the buffer did not answer in time.
        learner.group.LearnerRankDied: a learner rank died while writing (the trainer fails over).
    """
    import ray

    tmp = begin(run, step)
    t0 = time.perf_counter()
    learner.save_checkpoint(storage.join(tmp, "learner"))
    check_visible(storage.join(tmp, "learner"), [f"rng_rank{r}.pt" for r in range(len(learner.ranks))],
                  "its checkpoint part", run)
    buffer_state = ray.get(buffer.state_dict.remote(), timeout=300)
    storage.write_bytes(storage.join(tmp, "buffer.pkl"), pickle.dumps(buffer_state))
    storage.write_bytes(storage.join(tmp, "trainer.json"), json.dumps(trainer_state).encode())
    sync_outputs()
    return commit(tmp, step, keep, {"step": step, "seconds": time.perf_counter() - t0})


def restore(ckpt: str | Path, config: dict, *, learner, buffer, trainer, weight_sync) -> dict[str, float]:
    """Load ``ckpt`` (a local path or URI) into the freshly built parts of a run and bring every rollout
    worker to its weights: ``learner`` (each rank fetches its state itself), ``buffer`` (the replay buffer
    actor), ``trainer`` (`Trainer.load_state_dict`), then ``weight_sync`` pushes the restored policy.
    ``config`` is the current run config (``model_dump(mode="json")``), checked against the checkpoint's.

    In-flight requests of the checkpoint are queued for re-issue minus the groups that had already
    reached the buffer or been trained, so none is lost or duplicated (`Trainer.load_state_dict`).
    Returns ``{"resume/step", "resume/reissued_groups", "resume/seconds"}``.

    Raises:
        ValueError: the current config changes a field in `RESUME_INVARIANT_FIELDS` (all named).
        FileNotFoundError: the checkpoint is incomplete.
        TimeoutError: the learner, buffer or weight push did not answer in time.
    """
    import ray

    t0 = time.perf_counter()
    ckpt = str(ckpt)
    if not storage.exists(storage.join(ckpt, COMPLETE)):
        raise FileNotFoundError(f"checkpoint {ckpt} is incomplete (no {COMPLETE} marker)")
    step = int(_marker(ckpt)["step"])
    state = json.loads(storage.read_bytes(storage.join(ckpt, "trainer.json")))
    bad = incompatible_fields(state["config"], config)
    if bad:
        raise ValueError(f"cannot resume from {ckpt}: the config changes fields the checkpoint depends on: "
                         + "; ".join(bad))
    learner.load_checkpoint(storage.join(ckpt, "learner"))
    buffer_state = pickle.loads(storage.read_bytes(storage.join(ckpt, "buffer.pkl")))
    ray.get(buffer.load_state_dict.remote(buffer_state), timeout=300)
    done = {g[0].group_id for g in buffer_state["groups"]} | set(buffer_state["taken_ids"])
    reissued = trainer.load_state_dict(state, done)
    weight_sync.push_everywhere(step)
    logger.info("resumed from %s: policy version %d, %d in-flight groups to re-issue", ckpt, step, reissued)
    return {"resume/step": float(step), "resume/reissued_groups": float(reissued),
            "resume/seconds": time.perf_counter() - t0}
