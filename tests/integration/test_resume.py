"""Kill the driver with SIGKILL mid-run (the whole process group: driver, Ray, actors), resume from the
latest complete checkpoint, and check nothing was lost, duplicated, or changed.

The asynchronous run lives on an object store: ``output_dir = "s3://..."`` against a real S3-compatible
server (moto on loopback), two learner ranks that each upload their own checkpoint shards, the local
staging dir deleted after the kill, and ``--resume`` finding and finishing the run from the bucket alone;
the final model on S3 loads in transformers, and the storage credentials appear in no file the run wrote.

Each run is a real ``relayrl train`` subprocess with its own local Ray instance; the credentials and
endpoint reach it (and its actors) through the environment only.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest

from base import storage
from orchestrator.checkpoint import find_run_to_resume, latest_checkpoint
from orchestrator.run_outputs import logs_dir_of, staging_dir
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


@pytest.fixture(scope="module")
def sync_runs(tiny_sums_model, tmp_path_factory):
    """The synchronous runs of `test_sync_resume_after_sigkill_equals_uninterrupted_run`, going on in the
    background from the first test that asks for them (the S3 test, first in this file, so that they overlap
    its runs; each process is single-threaded much of the time): the uninterrupted reference beside a run
    SIGKILLed after a checkpoint and then resumed. Yields a future of ``(reference run dir, resumed run dir)``."""
    from concurrent.futures import ThreadPoolExecutor

    tmp = tmp_path_factory.mktemp("sync")

    def runs() -> tuple[Path, Path]:
        with ThreadPoolExecutor(1) as pool:  # synchronous runs do not depend on timing: the reference goes beside
            straight = pool.submit(_train, _config(tmp, tiny_sums_model, "straight", 0))
            cfg = _config(tmp, tiny_sums_model, "killed", 0)
            _train(cfg, kill_after_checkpoint=2)
            run = _run_dir(tmp, "killed")
            _train(cfg, "--resume", str(run))
            straight.result()
        return _run_dir(tmp, "straight"), run

    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(runs)


def _groups_to_reissue(run: str) -> tuple[float, float]:
    """``(step, groups)`` of the latest checkpoint of ``run`` (a path or URI): its in-flight groups that are
    neither held by the saved buffer nor already trained, i.e. what a resume must re-issue."""
    ckpt = latest_checkpoint(run)
    state = json.loads(storage.read_bytes(storage.join(ckpt, "trainer.json")))
    buf = pickle.loads(storage.read_bytes(storage.join(ckpt, "buffer.pkl")))
    done = {g[0].group_id for g in buf["groups"]} | set(buf["taken_ids"])
    keys = {k for r in state["inflight"] for k in r["keys"]}
    return float(state["staleness"]["version"]), float(len(keys - done))


def _jsonl(uri: str) -> list[dict]:
    return [json.loads(x) for x in storage.read_bytes(uri).decode().splitlines() if x.strip()]


@pytest.mark.timeout(900)
def test_async_run_on_s3_resumes_from_the_bucket_alone_losing_and_duplicating_nothing(tiny_sums_model, s3_bucket,
                                                                                     tmp_path, sync_runs):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output = storage.join(s3_bucket, "runs")
    cfg = tiny_run_toml(tmp_path / "s3run.toml", tiny_sums_model, output, "name=s3run", f"num_steps={STEPS}",
                        f"prompts_per_step={P}", "seed=5", "buffer.max_staleness=1", "learner.num_learners=2",
                        "learner.num_cpus=0.5", "learner.micro_batch_size=4", "checkpoint.every=1",
                        "checkpoint.keep=2", "ray.num_cpus=2")

    def checkpointed() -> bool:  # a complete checkpoint of a step in 2..STEPS-1 (see `_train`)
        run = find_run_to_resume(output, "s3run")
        return run is not None and 2 <= int(storage.basename(latest_checkpoint(run))[len("step_"):]) < STEPS

    train_cli(cfg, kill_when=checkpointed, timeout=400)
    run = find_run_to_resume(output, "s3run")
    expected = _groups_to_reissue(run)  # read from the checkpoint the resume will use, before it is pruned
    ckpts = storage.join(run, "checkpoints")
    first = storage.join(ckpts, storage.children(ckpts)[0])
    learner_files = storage.children(storage.join(first, "learner", "deepspeed"))
    # each rank uploaded its own part: its optimizer partition and its RNG state
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(
        learner_files), learner_files
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(storage.children(storage.join(first, "learner")))
    assert not storage.exists(storage.join(run, "final_model"))
    local = staging_dir(run)
    assert (local / "metrics.jsonl").is_file()
    shutil.rmtree(local)  # a fresh machine: nothing of the run is left locally

    train_cli(cfg, "--resume", timeout=400)  # auto: finds the run on S3 by its complete checkpoint
    steps = _jsonl(storage.join(run, "metrics.jsonl"))
    assert [r["step"] for r in steps if r["step"] > 0] == list(range(1, STEPS + 1))  # the curve continues
    (resumed,) = [r for r in steps if "resume/step" in r]
    assert resumed["step"] == resumed["resume/step"] + 1 and resumed["resume/step"] == expected[0] >= 2
    assert resumed["resume/reissued_groups"] == expected[1]
    trained = [g for r in _jsonl(storage.join(run, "trained_groups.jsonl")) for g in r["groups"]]
    assert len(trained) == STEPS * P and len(set(trained)) == len(trained)  # nothing lost, nothing trained twice
    s = json.loads(storage.read_bytes(storage.join(run, "summary.json")))
    # every dispatched group is accounted for: trained, still buffered, in flight, filtered or dropped
    parts = ("data/trained_groups", "data/groups_in_buffer", "data/groups_in_flight", "data/groups_filtered",
             "data/groups_dropped_stale")
    assert sum(s[k] for k in parts) == s["data/dispatched_groups"], s
    assert s["data/trained_groups"] == len(trained) and s["data/groups_dropped_stale"] == 0
    # dispatch keys are g0..g(D-1): the trained ones all come from that range
    assert {int(g[1:]) for g in trained} <= set(range(int(s["data/dispatched_groups"])))
    assert s["final_model"] == storage.join(run, "final_model") and s["step"] == STEPS
    assert storage.children(ckpts) == [f"step_{k:06d}" for k in (STEPS - 1, STEPS)]  # keep = 2, all complete
    # on resume each rank fetched only what DeepSpeed reads for it: its own optimizer partition and RNG state,
    # and the model states that both read once for the node (both ranks share this machine)
    log = (logs_dir_of(run) / "LearnerWorker.log").read_text()
    fetched = dict(re.findall(r"learner rank (\d) fetched \d of 3 checkpoint files \([\d.]+ MB\) from \S+: (\S+);",
                              log))
    assert sorted(fetched) == ["0", "1"], log[-3000:]
    model_states = "deepspeed/mp_rank_00_model_states.pt"
    for r, names in fetched.items():
        assert set(names.split(",")) - {model_states} == {f"deepspeed/zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                                                          f"rng_rank{r}.pt"}, fetched
    assert sum(model_states in names.split(",") for names in fetched.values()) == 1, fetched

    with storage.local_copy(storage.join(run, "final_model")) as model_dir:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(tiny_sums_model)
        ids = torch.tensor([tok("2 + 3 =")["input_ids"]])
        with torch.no_grad():
            logits, base_logits = model(ids).logits, base(ids).logits
        assert torch.isfinite(logits).all() and not torch.allclose(logits, base_logits)  # the trained policy

    # the credentials came from the environment and went nowhere: not on S3, not in the staging dir
    secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
    fs, root = storage.filesystem(s3_bucket)
    objects = fs.find(root)
    assert len(objects) > 20
    assert not [o for o in objects if secret in fs.cat_file(o)]
    assert not [p for p in local.rglob("*") if p.is_file() and secret in p.read_bytes()]


@pytest.mark.timeout(900)
def test_sync_resume_after_sigkill_equals_uninterrupted_run(sync_runs):
    ref, res = sync_runs.result(timeout=850)
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
