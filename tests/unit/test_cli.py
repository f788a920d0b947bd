"""Bad input gives a one-line error naming the problem and exit code 2, never a deep traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CFG = str(ROOT / "deploy" / "examples" / "arithmetic_smollm2.toml")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


@pytest.mark.parametrize("args,needle", [
    ((CFG, "model.path=/no/such/model"), "model path '/no/such/model' does not exist"),
    ((CFG, "learner.lr=fast"), "learner.lr"),
    (("/no/such.toml",), "does not exist"),
])
def test_bad_input_is_one_line(args, needle):
    r = _run("train", *args)
    assert r.returncode == 2, r.stderr
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("relayrl: error")]) == 1


def test_empty_dataset_is_one_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = _run("train", CFG, "data.type=jsonl", f"data.path={empty}")
    assert r.returncode == 2 and "empty" in r.stderr and "Traceback" not in r.stderr


def test_help_is_fast_and_lists_train():
    r = _run("--help")
    assert r.returncode == 0 and "train" in r.stdout


def test_trl_baseline_help_parses(capsys):
    from orchestrator.cli import main

    with pytest.raises(SystemExit) as e:
        main(["trl-baseline", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: relayrl trl-baseline" in out and "config" in out and "overrides" in out


def test_trl_baseline_bad_config_is_one_line(capsys):
    from orchestrator.cli import main

    assert main(["trl-baseline", "/no/such.toml", "learner.lr=1e-3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relayrl: error: ") and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_trl_baseline_refuses_unmappable_setting_before_loading_anything(capsys, tmp_path):
    from orchestrator.cli import main

    assert main(["trl-baseline", CFG, "learner.ppo_minibatches=2", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relayrl: error: ") and len(err.strip().splitlines()) == 1
    assert "learner.ppo_minibatches = 2" in err
    assert not list(tmp_path.iterdir())  # no run dir made


def test_overrides_may_follow_options_and_only_subcommands_that_take_them_get_them(capsys):
    from orchestrator.cli import cmd_train, parse_args

    args = parse_args(["train", "c.toml", "a.b=1", "--resume", "runs/x", "c.d=2"])
    assert (args.fn, args.config, args.resume, args.overrides) == (cmd_train, "c.toml", "runs/x", ["a.b=1", "c.d=2"])
    with pytest.raises(SystemExit) as e:
        parse_args(["report", "runs/x", "a.b=1"])
    assert e.value.code == 2 and "unrecognized arguments: a.b=1" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (("--reward-model", "judge"), "--reward-model 'judge' is not NAME=N"),
    (("--reward-model", "judge=two"), "--reward-model 'judge=two' is not NAME=N"),
    ((), "nothing to scale: give --rollout-workers N and/or --reward-model NAME=N"),
])
def test_scale_bad_arguments_are_one_line_before_connecting(args, needle):
    r = _run("scale", "some-run", *args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_run_control_scales_only_the_runs_own_reward_model_pools():
    from orchestrator.control import RunControl

    ctl = RunControl(2, {"judge": 1})
    assert ctl.request_reward_model_scale("judge", 3) == 3 and ctl.desired_reward_models() == {"judge": 3}
    assert ctl.status()["desired_reward_model_workers"] == {"judge": 3}
    with pytest.raises(ValueError, match=r"no reward-model pool 'jduge' \(its \[\[reward_models\]\]: \['judge'\]\)"):
        ctl.request_reward_model_scale("jduge", 2)
    with pytest.raises(ValueError, match="reward model 'judge': workers must be >= 1, got 0"):
        ctl.request_reward_model_scale("judge", 0)
    assert "desired_reward_model_workers" not in RunControl(1).status()  # a run without pools says nothing of them
