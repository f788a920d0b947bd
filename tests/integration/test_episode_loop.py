"""Multi-turn episodes in a real run (Ray, vLLM, DeepSpeed; tiny sums model; textarena's GuessTheNumber, two
turns per game): a rollout worker killed with episodes in flight, a SIGKILLed run resumed with episodes in
flight (nothing lost or trained twice), and environment failures: counted under the budget, the run stopped
naming the environment above it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray

from orchestrator.loop import Trainer
from rollout.tasks import load_problems
from rollout.worker import RolloutWorker
from tiny_run import tiny_run_config, train_cli

pytestmark = pytest.mark.integration
EPISODES = ("rollout.env.type=textarena", "rollout.env.max_turns=2", "rollout.env.max_episode_tokens=300",
            "rollout.env.options={env_kwargs = {max_turns = 2}}", "rollout.max_model_len=1024")
PARTS = ("data/trained_groups", "data/groups_in_buffer", "data/groups_in_flight", "data/groups_filtered",
         "data/groups_dropped_stale")


def _trained(run: Path) -> list[str]:
    return [g for x in (run / "trained_groups.jsonl").read_text().splitlines() for g in json.loads(x)["groups"]]


@pytest.mark.timeout(600)
def test_killed_worker_with_episodes_in_flight_loses_and_duplicates_nothing(tiny_sums_model, ray_local, tmp_path):
    import threading
    import time

    cfg = tiny_run_config(tiny_sums_model, tmp_path, "buffer.max_staleness=1", "seed=2", *EPISODES)
    t = Trainer(cfg, tmp_path / "run", tiny_sums_model, load_problems(cfg.data, "train"), [])
    killed = []

    def kill_when_busy():  # kill the only worker while a request (its episodes) is in flight, after step 1
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if t.version >= 1 and t.dispatcher.requests:
                ray.kill(t.rollout.workers[0], no_restart=False)
                killed.append(t.version)
                return
            time.sleep(0.05)

    th = threading.Thread(target=kill_when_busy, daemon=True)
    th.start()
    try:
        summary = t.run(progress=False)
        th.join(5)
    finally:
        t.shutdown()
    assert killed, "the worker was never killed"
    assert summary["rollout/worker_restarts"] >= 1 and summary["rollout/retried_groups"] >= 1, summary
    trained = _trained(tmp_path / "run")
    assert len(trained) == 3 * 4 and len(set(trained)) == len(trained)
    assert sum(summary[k] for k in PARTS) == summary["data/dispatched_groups"], summary
    assert summary["rollout/turns_per_sample"] > 1.0  # these were multi-turn episodes


@pytest.mark.timeout(900)
def test_resume_with_episodes_in_flight_loses_and_duplicates_nothing(tiny_sums_model, tmp_path):
    steps = 5
    cfg = tmp_path / "ep.toml"
    cfg.write_text(f"""
name = "ep"
output_dir = "{tmp_path / 'ep'}"
num_steps = {steps}
prompts_per_step = 4
seed = 11
[model]
path = "{tiny_sums_model}"
[data]
train_size = 100
eval_size = 0
one_shot = false
task_config = {{ min_terms = 2, max_terms = 2, max_digits = 1, operators = ["+"], allow_parentheses = false, allow_negation = false }}
[rollout]
group_size = 4
max_tokens = 16
dtype = "float32"
kv_cache_memory_bytes = 67108864
max_model_len = 1024
prompts_per_request = 2
[rollout.env]
type = "textarena"
max_turns = 2
max_episode_tokens = 300
options = {{ env_kwargs = {{ max_turns = 2 }} }}
[buffer]
max_staleness = 2
[learner]
micro_batch_size = 8
dtype = "fp32"
lr = 1e-3
[checkpoint]
every = 1
keep = 2
[ray]
num_cpus = 2
""")

    def checkpointed() -> bool:  # any complete checkpoint of steps 2..steps-1 (a kill at the last leaves nothing)
        return any(list(tmp_path.glob(f"ep/*/checkpoints/step_{k:06d}/COMPLETE")) for k in range(2, steps))

    from test_resume import _groups_to_reissue

    train_cli(cfg, kill_when=checkpointed, timeout=500)
    (run,) = [p for p in (tmp_path / "ep").iterdir() if p.is_dir()]
    expected = _groups_to_reissue(run)  # in-flight episodes' groups the checkpoint holds no result of
    train_cli(cfg, "--resume", str(run), timeout=500)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    resumed = [r for r in records if "resume/step" in r]
    assert len(resumed) == 1 and resumed[0]["resume/step"] == expected[0] and 2 <= expected[0] < steps, resumed
    assert resumed[0]["resume/reissued_groups"] == expected[1], (resumed, expected)
    trained = _trained(run)
    assert len(trained) == steps * 4 and len(set(trained)) == len(trained)  # nothing lost, nothing trained twice
    s = json.loads((run / "summary.json").read_text())
    assert sum(s[k] for k in PARTS) == s["data/dispatched_groups"], s
    rolled = [r for r in records if r.get("rollout/turns_per_sample", 0) > 0]  # steps that generated
    assert rolled and all(r["rollout/turns_per_sample"] > 1.0 for r in rolled), records  # multi-turn episodes


class OneInFourFails(RolloutWorker):
    """The real textarena game, but every 4th episode's step raises (episodes counted per worker process)."""

    def __init__(self, *args, **kwargs):
        from rollout.envs.base import ENVIRONMENTS
        from rollout.envs.textarena_env import TextArena

        class Flaky(TextArena):
            resets = 0

            def reset(self, seed):
                Flaky.resets += 1
                self.fails = Flaky.resets % 4 == 0
                return super().reset(seed)

            def step(self, action):
                if self.fails:
                    raise ConnectionError("game server went away")
                return super().step(action)

        ENVIRONMENTS["textarena"] = Flaky
        super().__init__(*args, **kwargs)


@pytest.mark.timeout(600)
def test_environment_failures_are_counted_and_above_the_budget_stop_the_run(tiny_sums_model, ray_local, tmp_path):
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    cfg = tiny_run_config(tiny_sums_model, tmp_path, "num_steps=2", "rollout.env.max_failure_frac=0.5", *EPISODES)
    t = Trainer(cfg, tmp_path / "ok", tiny_sums_model, load_problems(cfg.data, "train"), [],
                rollout_worker_cls=OneInFourFails)
    try:
        summary = t.run(progress=False)
    finally:
        t.shutdown()
    recs = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    rolled = [r for r in recs if r.get("rollout/turns_per_sample", 0) > 0]  # steps that generated (async: not all)
    assert rolled and all(r["rollout/env_failed_frac"] == 0.25 for r in rolled), recs
    assert summary["data/trained_groups"] == 2 * 4, summary  # failed episodes are kept (masked), groups trained
    cfg = tiny_run_config(tiny_sums_model, tmp_path, "num_steps=2", "rollout.env.max_failure_frac=0.1", *EPISODES)
    t = Trainer(cfg, tmp_path / "stop", tiny_sums_model, load_problems(cfg.data, "train"), [],
                rollout_worker_cls=OneInFourFails)
    try:
        with pytest.raises(RuntimeError, match=r"environment 'textarena': 2 of 8 episodes failed .*max_failure_frac "
                                               r"= 0.1\); first: .*ConnectionError: game server went away"):
            t.run(progress=False)
    finally:
        t.shutdown()
