"""Kill the driver with SIGKILL mid-run (the whole process group: driver, Ray, actors), resume from the
latest complete checkpoint, and check nothing was lost, duplicated, or changed.

Each run is a real ``relayrl train`` subprocess with its own local Ray instance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiny_run import tiny_run_toml, train_cli

pytestmark = pytest.mark.integration
P, STEPS = 4, 6


def _config(tmp_path: Path, model: str, name: str, staleness: int) -> Path:
    return tiny_run_toml(tmp_path / f"{name}.toml", model, tmp_path / name, f"name={name}", f"num_steps={STEPS}",
                         f"prompts_per_step={P}", "seed=11", f"buffer.max_staleness={staleness}",
                         "checkpoint.every=1", "checkpoint.keep=2", "ray.num_cpus=2")


def _train(cfg: Path, *extra: str, kill_after_checkpoint: int | None = None, timeout: float = 400) -> None:
    """``relayrl train``; with ``kill_after_checkpoint = k``, SIGKILLed once a checkpoint of a step in
    ``k..STEPS-1`` is complete (steps are short here: polling may miss step k's before it is
    pruned, and a kill at the last step would leave nothing to resume)."""

    def done() -> bool:
        return any(list(cfg.parent.glob(f"{cfg.stem}/*/checkpoints/step_{k:06d}/COMPLETE"))
                   for k in range(kill_after_checkpoint, STEPS))

    train_cli(cfg, *extra, kill_when=done if kill_after_checkpoint is not None else None, timeout=timeout)


def _records(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(x) for x in (run_dir / name).read_text().splitlines() if x.strip()]


def _run_dir(tmp_path: Path, name: str) -> Path:
    (d,) = [p for p in (tmp_path / name).iterdir() if p.is_dir()]
    return d


@pytest.mark.timeout(900)
def test_sync_resume_after_sigkill_equals_uninterrupted_run(tiny_sums_model, tmp_path):
    _train(_config(tmp_path, tiny_sums_model, "straight", 0))
    cfg = _config(tmp_path, tiny_sums_model, "killed", 0)
    _train(cfg, kill_after_checkpoint=2)
    run = _run_dir(tmp_path, "killed")
    _train(cfg, "--resume", str(run))

    ref, res = _run_dir(tmp_path, "straight"), run
    a = [r for r in _records(ref, "metrics.jsonl") if r["step"] > 0]
    b = [r for r in _records(res, "metrics.jsonl") if r["step"] > 0]
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))  # the curve continues; later records replaced
    resumed = [r for r in b if "resume/step" in r]  # the first step after the resume carries these
    assert len(resumed) == 1 and resumed[0]["step"] == resumed[0]["resume/step"] + 1, resumed
    assert 2 <= resumed[0]["resume/step"] < STEPS  # the kill lands after checkpoint 2 or a later one
    assert resumed[0]["resume/reissued_groups"] == 0.0  # synchronous: nothing in flight at a checkpoint
    for x, y in zip(a, b):
        assert x["rollout/reward_mean"] == y["rollout/reward_mean"], x["step"]
        assert x["learner/loss"] == pytest.approx(y["learner/loss"], rel=1e-4, abs=1e-6), x["step"]
        assert x["learner/grad_norm"] == pytest.approx(y["learner/grad_norm"], rel=1e-3), x["step"]
    # same groups at every step (dispatch keys map to prompts through the restored cursor); order within
    # a batch follows which of the two requests reached the buffer first, so compare per step as sets
    per_step = lambda d: [(r["step"], sorted(r["groups"])) for r in _records(d, "trained_groups.jsonl")]  # noqa: E731
    assert per_step(ref) == per_step(res)
    assert len(list((res / "checkpoints").glob("step_*"))) == 2  # keep = 2


def _groups_to_reissue(run: Path) -> tuple[float, float]:
    """``(step, groups)`` of the latest checkpoint: its in-flight groups that are neither held by the
    saved buffer nor already trained, i.e. what a resume must re-issue."""
    import pickle

    from orchestrator.checkpoint import latest_checkpoint

    ckpt = Path(latest_checkpoint(run))
    state = json.loads((ckpt / "trainer.json").read_text())
    with open(ckpt / "buffer.pkl", "rb") as f:
        buf = pickle.load(f)
    done = {g[0].group_id for g in buf["groups"]} | set(buf["taken_ids"])
    keys = {k for r in state["inflight"] for k in r["keys"]}
    return float(state["staleness"]["version"]), float(len(keys - done))


@pytest.mark.timeout(900)
def test_async_resume_loses_and_duplicates_no_prompt(tiny_sums_model, tmp_path):
    cfg = _config(tmp_path, tiny_sums_model, "async", 1)
    _train(cfg, kill_after_checkpoint=2)
    run = _run_dir(tmp_path, "async")
    expected = _groups_to_reissue(run)  # read from the checkpoint the resume will use, before it is pruned
    _train(cfg, "--resume")  # auto: the newest run of this name with a complete checkpoint
    resumed = [r for r in _records(run, "metrics.jsonl") if "resume/step" in r]
    assert len(resumed) == 1 and resumed[0]["resume/step"] == expected[0] >= 2
    assert resumed[0]["resume/reissued_groups"] == expected[1]
    trained = [g for r in _records(run, "trained_groups.jsonl") for g in r["groups"]]
    assert len(trained) == STEPS * P and len(set(trained)) == len(trained)  # nothing trained twice
    s = json.loads((run / "summary.json").read_text())
    # every dispatched group is accounted for: trained, still buffered, in flight, filtered or dropped
    parts = ("data/trained_groups", "data/groups_in_buffer", "data/groups_in_flight", "data/groups_filtered",
             "data/groups_dropped_stale")
    assert sum(s[k] for k in parts) == s["data/dispatched_groups"], s
    assert s["data/trained_groups"] == len(trained) and s["data/groups_dropped_stale"] == 0
    # dispatch keys are g0..g(D-1): the trained ones all come from that range
    assert {int(g[1:]) for g in trained} <= set(range(int(s["data/dispatched_groups"])))
