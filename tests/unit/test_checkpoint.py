"""Checkpoint layout: atomic commit, retention, interrupted writes ignored, resume compatibility; each on a
local dir and on a real S3-compatible server (moto on loopback, `s3_bucket`). Save and restore hand each
part (a real replay buffer actor, the driver's real state) its own state; the learner group and weight
sync are in-process stand-ins for DeepSpeed ranks and rollout workers."""

from __future__ import annotations

import json

import pytest

from base import storage
from buffer import PROMPT_SAMPLERS, GenerateRequest, Problem, ReplayBuffer, Sample, StalenessManager
from buffer.allocation import RolloutAllocator
from orchestrator import checkpoint
from orchestrator.checkpoint import (COMPLETE, begin, commit, complete_checkpoints, find_run_to_resume,
                                     incompatible_fields, latest_checkpoint)
from orchestrator.cli import main
from orchestrator.clock import RunClock
from orchestrator.config import load_config
from orchestrator.dispatch import Dispatcher, InFlight
from orchestrator.loop import Trainer
from orchestrator.tally import RolloutTally


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> str:
    """Where runs go: a local dir, or a prefix in a fresh bucket of the test S3 server."""
    return str(tmp_path) if request.param == "local" else request.getfixturevalue("s3_bucket") + "/runs"


def _write(run: str, step: int, keep: int = 2) -> str:
    tmp = begin(run, step)
    storage.write_bytes(storage.join(tmp, "trainer.json"), b"{}")
    return commit(tmp, step, keep, {"step": step})


def test_commit_is_atomic_and_keeps_the_newest(where):
    run = storage.join(where, "r-1")
    for step in (1, 2, 3):
        _write(run, step)
    assert [storage.basename(p) for p in complete_checkpoints(run)] == ["step_000002", "step_000003"]
    assert storage.children(storage.join(run, "checkpoints")) == ["step_000002", "step_000003"]  # step 1 deleted
    # interrupted writes: a begun checkpoint with its files but no marker (on S3 under its own prefix),
    # and a step dir without the marker; both are ignored
    tmp = begin(run, 4)
    storage.write_bytes(storage.join(tmp, "learner", "rng_rank0.pt"), b"x")
    storage.write_bytes(storage.join(tmp, "trainer.json"), b"{}")
    storage.write_bytes(storage.join(run, "checkpoints", "step_000005", "trainer.json"), b"{}")
    assert storage.basename(latest_checkpoint(run)) == "step_000003"
    assert find_run_to_resume(where, "r") == run
    # the marker is the last thing written: once it exists, the checkpoint counts
    done = _write(run, 4)
    assert storage.basename(done) == "step_000004" and latest_checkpoint(run) == done
    assert storage.exists(storage.join(done, COMPLETE))
    assert not storage.exists(storage.join(done, "learner", "rng_rank0.pt"))  # the stale attempt was removed
    with pytest.raises(FileExistsError):
        _write(run, 4)


def test_find_run_to_resume_picks_newest_with_checkpoint(where):
    storage.write_bytes(storage.join(where, "job-a", "config.json"), b"{}")  # no checkpoint
    _write(storage.join(where, "job-c"), 1)
    _write(storage.join(where, "job-b"), 1)  # committed last
    _write(storage.join(where, "other-d"), 2)
    assert find_run_to_resume(where, "job") == storage.join(where, "job-b")
    assert find_run_to_resume(where, "none") is None
    assert find_run_to_resume(storage.join(where, "missing"), "job") is None


def test_incompatible_fields_are_named():
    a = load_config(None, []).model_dump(mode="json")
    b = load_config(None, ["rollout.group_size=4", "prompts_per_step=16", "learner.lr=1e-3", "num_steps=99"])
    bad = incompatible_fields(a, b.model_dump(mode="json"))
    assert bad == ["prompts_per_step: 8 -> 16", "rollout.group_size: 8 -> 4"]  # lr and num_steps may change


def test_resume_of_a_dir_without_checkpoint_is_a_clear_error(where, tmp_path, capsys):
    run = storage.join(where, "run")
    storage.write_bytes(storage.join(run, "config.json"), b"{}")
    storage.write_bytes(storage.join(run, "checkpoints", "step_000001", "trainer.json"), b"{}")  # no marker
    cfg = tmp_path / "c.toml"
    cfg.write_text('num_steps = 1\n[data]\ntrain_size = 8\neval_size = 0\n')
    rc = main(["train", str(cfg), "--resume", run, "model.path=/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2 and "no complete checkpoint" in err and run in err


# ---- save / restore: each part gets its own state back ------------------------------------------------

def _driver(cfg) -> Trainer:
    """The driver's part of a `Trainer` (what `Trainer.state_dict` covers: admission, rollout tally, prompt
    sampler, allocator, clock, requests in flight), built as `Trainer.__init__` builds it but without actors."""
    t = Trainer.__new__(Trainer)
    bc, rc, P = cfg.buffer, cfg.rollout, cfg.prompts_per_step
    problems = [Problem(f"train/{i}", f"q{i}", str(i)) for i in range(32)]
    t.cfg, t.eval_start, t.reissue = cfg, None, []
    t.staleness = StalenessManager(bc.max_staleness, P, cfg.num_steps)
    t.tally = RolloutTally(rc.max_reward_failure_frac)
    t.sampler = PROMPT_SAMPLERS[bc.prompt_sampler](problems, cfg.seed, group_size=rc.group_size,
                                                    floor=bc.sampler_floor)
    t.allocator = RolloutAllocator(bc.rollout_allocation, rc.group_size, P, bc.allocation_min_n, bc.allocation_max_n)
    t.clock = RunClock(train_seconds=12.5, trained_samples=64)
    t.dispatcher = Dispatcher(cfg, None, None, t.staleness, t.tally, None, t.sampler, t.allocator)
    return t


def _mid_run(cfg) -> Trainer:
    """A driver one step in, with one request of 4 groups (g0..g3) in flight."""
    t = _driver(cfg)
    t.staleness.advance()
    keys, min_version = t.staleness.admit(4)
    problems, sizes = t.allocator.take(t.sampler, len(keys))
    t.dispatcher.requests["ref"] = InFlight(GenerateRequest(problems, keys, sizes, min_version, 7), 0, 0, None)
    t.staleness.sent(len(keys))
    t.tally.samples_total, t.eval_start = 40, [True, False]
    return t


def _before_run_clock(state: dict) -> dict:
    """``trainer.json`` as written before `RunClock`: the clock's totals at the top level."""
    old = {k: v for k, v in state.items() if k != "clock"}
    old.update(state["clock"])
    return old


def test_trainer_state_round_trips_and_the_layout_before_run_clock_still_loads():
    cfg = load_config(None, [])
    a = _mid_run(cfg)
    state = json.loads(json.dumps(a.state_dict()))
    assert state["clock"] == {"train_seconds": 12.5, "trained_samples": 64}
    old = _before_run_clock(state)
    assert "clock" not in old and old["train_seconds"] == 12.5
    for saved in (state, old):
        b = _driver(cfg)
        b.clock = RunClock()
        assert b.load_state_dict(saved, {"g1"}) == 3  # g1 reached the buffer: g0, g2, g3 are re-issued
        assert [r.keys for r in b.reissue] == [("g0", "g2", "g3")]
        got = b.state_dict()
        for part in ("clock", "tally", "sampler", "allocator", "eval_start", "config"):
            assert got[part] == state[part], part
        assert b.version == 1 and b.staleness.kept == 1


class _Learner:
    """A `learner.LearnerGroup`'s checkpoint methods for one rank, without DeepSpeed."""

    ranks = [None]
    loaded = None

    def save_checkpoint(self, ckpt_dir: str) -> None:
        storage.write_bytes(storage.join(ckpt_dir, "rng_rank0.pt"), b"rng")

    def load_checkpoint(self, ckpt_dir: str) -> None:
        assert storage.exists(storage.join(ckpt_dir, "rng_rank0.pt"))
        self.loaded = ckpt_dir


class _WeightSync:
    pushed = None

    def push_everywhere(self, version: int) -> None:
        self.pushed = version


def _group(key: str) -> list[Sample]:
    return [Sample("p", key, [1, 2], [3, 4], [-0.1, -0.2], [0, 0]) for _ in range(2)]


def test_save_and_restore_hand_each_part_its_own_state(where, ray_local):
    ray = ray_local
    cfg = load_config(None, [])
    run = storage.join(where, "r-1")
    a, buf, synced = _mid_run(cfg), ray.remote(ReplayBuffer).remote(), []
    ray.get(buf.add_groups.remote([_group("g0"), _group("g1")]))
    ray.get(buf.take_batch.remote(1, 1, 0))  # g0 trained, g1 held
    path = checkpoint.save(run, a.version, 2, learner=_Learner(), buffer=buf, trainer_state=a.state_dict(),
                           sync_outputs=lambda: synced.append(latest_checkpoint(run)))
    assert synced == [None]  # the outputs were synced before the checkpoint counted
    assert storage.basename(path) == "step_000001" and latest_checkpoint(run) == path

    b, buf2, learner, ws = _driver(cfg), ray.remote(ReplayBuffer).remote(), _Learner(), _WeightSync()
    m = checkpoint.restore(path, cfg.model_dump(mode="json"), learner=learner, buffer=buf2, trainer=b, weight_sync=ws)
    assert learner.loaded == storage.join(path, "learner") and ws.pushed == 1
    assert ray.get(buf2.group_ids.remote()) == ({"g1"}, {"g0"})
    assert m["resume/step"] == 1.0 and m["resume/reissued_groups"] == 2.0  # g2, g3
    assert b.version == 1 and b.clock.state_dict() == a.clock.state_dict()
    with pytest.raises(ValueError, match="rollout.group_size: 8 -> 4"):
        other = load_config(None, ["rollout.group_size=4"])
        checkpoint.restore(path, other.model_dump(mode="json"), learner=learner, buffer=buf2, trainer=_driver(other),
                           weight_sync=ws)
