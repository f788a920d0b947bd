"""The example user project examples/word_problems (docs/bring_your_own_task.md): its reward functions on
hand-made completions, its run config loading with its reward functions passing relayrl's start-up check
against the data's columns, and the shipped data being what its make_data.py writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from orchestrator.config import RunConfig, load_config
from rollout.rewards import RewardSet, reward_columns

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "word_problems"
CONFIG = EXAMPLE / "config.toml"


@pytest.fixture
def at_root(monkeypatch):
    """Run from the repository root, as the README's command does: the config's data paths and import paths
    are relative to it."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(str(ROOT))


@pytest.fixture
def rewards(at_root):
    import examples.word_problems.rewards as module

    return module


def test_correct_reads_the_answer_line_and_the_unit_column(rewards):
    completions = [
        "5 + 7 = 12.\nAnswer: 12",            # right
        "5 + 7 = 12.\nAnswer: 12 apples.",    # right, with the row's unit and a full stop
        "Answer: 12 pencils",                 # another unit than the row's: not a number
        "5 + 7 = 12, so 12 apples.",          # no Answer: line
        "Answer: 10\nAnswer: 13",             # the last Answer: line counts
        "Answer: 11",                         # wrong
    ]
    n = len(completions)
    got = rewards.correct(prompts=["p"] * n, completions=completions, answer=["12"] * n, unit=["apples"] * n,
                          op=["add"] * n)
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert rewards.correct(prompts=["p"], completions=["Answer: 1,200"], answer=["1200"], unit=["cards"]) == [1.0]


def test_answer_format_rewards_a_bare_final_answer_line_right_or_wrong(rewards):
    completions = ["3 + 4 = 7.\nAnswer: 7", "Answer: 99\n", "Answer: 7 apples", "Answer: 7\nThat is all.",
                   "The answer is 7.", ""]
    assert rewards.answer_format(prompts=["p"] * 6, completions=completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]


def test_config_loads_and_its_rewards_pass_the_start_up_check(at_root):
    cfg = load_config(CONFIG)
    assert [(r.name, r.weight) for r in cfg.rollout.rewards] == [("correct", 1.0), ("answer_format", 0.2)]
    columns = reward_columns(cfg.data)
    assert set(columns) == {"answer", "unit", "op"}
    # what RolloutGroup runs on the driver before any actor starts: import, signature against the columns
    rs = RewardSet(cfg.rollout.rewards, cfg.rollout.reward_timeout_s, columns)
    score = rs.score("Mia has 5 apples. She gets 7 more apples. How many apples does Mia have now?",
                     "5 + 7 = 12.\nAnswer: 12", "12", {"answer": "12", "unit": "apples", "op": "add"})
    assert score.error == "" and score.terms == {"correct": 1.0, "answer_format": 1.0}
    assert score.reward == pytest.approx(1.2) and score.correct


def test_the_check_refuses_data_without_the_unit_column(at_root, tmp_path):
    rows = tmp_path / "no_unit.jsonl"
    rows.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n")
    cfg = load_config(CONFIG, [f"data.path={rows}"])
    with pytest.raises(ValueError, match="correct.*unit"):
        RewardSet(cfg.rollout.rewards, cfg.rollout.reward_timeout_s, reward_columns(cfg.data))


def test_shipped_data_is_what_make_data_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["make_data.py", "--out", str(tmp_path)])
    sys.path.insert(0, str(EXAMPLE))
    try:
        import make_data

        make_data.main()
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("make_data", None)
    for split in ("train", "eval"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (EXAMPLE / "data" / f"{split}.jsonl").read_text(), split
    train = {json.loads(x)["prompt"] for x in (tmp_path / "train.jsonl").read_text().splitlines()}
    held_out = {json.loads(x)["prompt"] for x in (tmp_path / "eval.jsonl").read_text().splitlines()}
    assert len(train) == 600 and len(held_out) == 200 and not train & held_out


def test_second_chance_environment_plays_two_answers_with_the_runs_rewards(at_root):
    from buffer import Problem
    from rollout.envs import environment_class, make_environment

    cfg = load_config(CONFIG, ["rollout.env.type=examples.word_problems.envs:SecondChance",
                               "rollout.env.max_turns=2", "rollout.env.max_episode_tokens=192"])
    assert environment_class(cfg.rollout.env.type).__name__ == "SecondChance"
    rs = RewardSet(cfg.rollout.rewards, 5.0, reward_columns(cfg.data))
    problem = Problem("eval/0", "Tom has 5 cookies. He gets 10 more cookies. How many cookies does Tom have now?",
                      "15", columns={"answer": "15", "unit": "cookies", "op": "add"})

    def play(*answers):
        env = make_environment(cfg.rollout.env, problem,
                               lambda text, ref: rs.score(problem.question, text, ref, problem.columns))
        opening = env.reset(0)
        assert opening[-1]["content"].startswith(problem.question) and opening[1]["role"] == "assistant"
        return [env.step(a) for a in answers]

    first = play("5 + 10 = 15.\nAnswer: 15")
    assert len(first) == 1 and first[0].done and first[0].info["correct"] and first[0].reward == pytest.approx(1.2)
    assert first[0].info["reward_terms"] == {"correct": 1.0, "answer_format": 1.0}
    wrong, second = play("Answer: 14", "5 + 10 = 15.\nAnswer: 15")
    assert not wrong.done and wrong.reward == 0.0 and "not right" in wrong.observation[0]["content"]
    assert second.done and second.info["correct"] and second.reward == pytest.approx(0.5 * 1.2)
    wrong, again = play("Answer: 14", "Answer: 13")
    assert again.done and not again.info["correct"] and again.reward == pytest.approx(0.5 * 0.2)  # format only
    with pytest.raises(ValueError, match="retry_weight"):
        make_environment(cfg.rollout.env.model_copy(update={"options": {"retry_weight": 2}}), problem)


def test_record_run_writes_the_figures_from_the_runs_own_files(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"eval_size": 200}, "prompts_per_step": 8,
                                                 "rollout": {"group_size": 8}}))
    records = [{"step": 0, "eval/accuracy": 0.3}, {"step": 1, "rollout/reward/correct": 0.25, "perf/train_seconds": 9.0},
               {"step": 2, "perf/train_seconds": 20.0, "eval/accuracy": 0.4, "eval/gain": 0.1, "eval/gain_se": 0.02}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({"step": 2, "perf/train_seconds": 20.0, "time/elapsed_s": 31.0}))
    probe = tmp_path / "probe.out"
    probe.write_text('log line\n{"mixed_group_frac": 0.7}\n')
    out = tmp_path / "record.json"
    monkeypatch.setattr(sys, "argv", ["record_run.py", str(run), "--command", "relayrl train x.toml", "--out", str(out),
                                      "--probe", "probe x.toml", str(probe)])
    sys.path.insert(0, str(EXAMPLE))
    try:
        import record_run

        assert record_run.main() == 0
        (run / "summary.json").unlink()
        assert record_run.main() == 2  # an unfinished run is refused
    finally:
        sys.path.remove(str(EXAMPLE))
        sys.modules.pop("record_run", None)
    rec = json.loads(out.read_text())
    assert rec["held_out"]["before"] == 0.3 and rec["held_out"]["after"] == 0.4 and rec["held_out"]["gain"] == 0.1
    assert rec["steps"] == 2 and rec["samples_per_step"] == 64 and rec["train_seconds"] == 20.0
    assert rec["per_step"][0] == {"step": 1, "rollout/reward/correct": 0.25, "perf/train_seconds": 9.0}
    assert rec["probes"] == [{"command": "probe x.toml", "result": {"mixed_group_frac": 0.7}}]
    assert rec["machine"]["cores"] >= 1 and rec["command"] == "relayrl train x.toml"


ENGINE_SPEED_KNOBS = ("kv_cache_memory_bytes", "block_size", "eval_num_threads")


def test_the_docs_cite_the_recorded_run_of_this_config(at_root):
    """docs/example_word_problems.json is record_run.py's record of `relayrl train examples/word_problems/config.toml`:
    the config it ran is today's config, and the page quotes its held-out figures."""
    rec = json.loads((ROOT / "docs" / "example_word_problems.json").read_text())
    # the recorded config read by today's model: fields added since then count at their defaults
    ran = RunConfig.model_validate(rec["config"]).model_dump(mode="json")
    now = load_config(CONFIG).model_dump(mode="json")
    # engine-memory knobs change how fast the engine samples (preemptions, prefix reuse), not what it samples
    # from: the recorded run used the then default 256 MiB KV cache of 128-token blocks (docs/generation_profile.md)
    for cfg in (ran, now):
        for knob in ENGINE_SPEED_KNOBS:
            cfg["rollout"].pop(knob, None)
    for key in ("num_steps", "prompts_per_step", "eval_every", "model", "data", "rollout", "buffer", "learner"):
        assert ran[key] == now[key], f"{key} changed since the recorded run: rerun and record it"
    held = rec["held_out"]
    page = (ROOT / "docs" / "bring_your_own_task.md").read_text()
    assert f"{held['before']:.3f} -> {held['after']:.3f}" in page and "example_word_problems.json" in page
    assert rec["steps"] == now["num_steps"] and rec["command"] in page
