"""Environments from the user's own code (``rollout.env.type = "pkg.module:Class"``) through the one registry,
the environment hooks a rollout worker calls at start, and how each reward function's part travels from an
episode's answer to the ``rollout/reward/<name>`` metrics."""

from __future__ import annotations

import itertools
import math
import sys
import textwrap

import pytest
from pydantic import ValidationError

from base.user_code import code_roots
from buffer import Problem, RolloutResult
from rollout.config import DataConfig, RewardConfig, RolloutConfig
from rollout.engine import Completion
from rollout.envs import ENVIRONMENTS, EnvConfig, environment_class, make_environment
from rollout.envs.builtin import SingleTurn, ToolMath
from rollout.episode import Episode, TurnEncoder, run_episodes
from rollout.rewards import RewardSet

PROBLEM = Problem("train/0", "What is 2 + 3?", "5")

USER_ENVS = '''
from rollout.envs import Environment, StepResult
from rollout.envs.builtin import answer_step


class SecondThoughts(Environment):
    """Asks "Are you sure?" once, then scores the second answer with the run's reward functions."""

    @classmethod
    def worker_config(cls, cfg, rollout, data):
        return cfg.model_copy(update={"options": {"question_prefix": data.instruction[:5], **cfg.options}})

    def reset(self, seed):
        self.turn = 0
        return [{"role": "user", "content": self.options.get("question_prefix", "") + self.problem.question}]

    def step(self, action):
        self.turn += 1
        if self.turn == 1:
            return StepResult([{"role": "user", "content": "Are you sure?"}], 0.0, False)
        return answer_step(self, action)


class Incomplete(Environment):
    def reset(self, seed):
        return []


class NotAnEnvironment:
    pass


def not_a_class():
    pass
'''

USER_REWARDS = '''
def length_reward(completions, **kwargs):
    return [len(c) / 10 for c in completions]

def numeric_only(completions, answer, **kwargs):
    return [None if not a.isdigit() else 1.0 for a in answer]
'''

_ids = itertools.count()


@pytest.fixture
def user_modules(tmp_path, monkeypatch) -> tuple[str, str]:
    """``(envs module, rewards module)``: fresh modules in ``tmp_path``, importable from there."""
    n = next(_ids)
    envs, rewards = f"user_envs_{n}", f"user_env_rewards_{n}"
    (tmp_path / f"{envs}.py").write_text(textwrap.dedent(USER_ENVS))
    (tmp_path / f"{rewards}.py").write_text(textwrap.dedent(USER_REWARDS))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield envs, rewards
    for name in (envs, rewards):
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    from tiny_model import build_tiny_model
    from transformers import AutoTokenizer

    return TurnEncoder(AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tok"))))


def test_a_user_environment_by_import_path(user_modules):
    envs, _ = user_modules
    cfg = EnvConfig(type=f"{envs}:SecondThoughts", max_turns=2)
    cls = environment_class(cfg.type)
    assert cls.__name__ == "SecondThoughts" and f"{envs}:SecondThoughts" not in ENVIRONMENTS  # no second list
    env = make_environment(cfg, PROBLEM)
    assert env.reset(0) == [{"role": "user", "content": PROBLEM.question}]
    assert env.step("6").observation == [{"role": "user", "content": "Are you sure?"}]
    r = env.step("Answer: 5")
    assert r.done and r.reward == 1.0 and r.info == {"correct": True}
    # the hook a rollout worker calls at start: settings from other sections
    worker_cfg = cls.worker_config(cfg, RolloutConfig(), DataConfig())
    assert worker_cfg.options == {"question_prefix": DataConfig().instruction[:5]}
    assert cls.check_worker(worker_cfg) == ""


def test_a_user_environment_through_the_run_config(user_modules, tmp_path):
    from orchestrator.config import ConfigError, load_config

    envs, _ = user_modules
    cfg = load_config(None, [f'rollout.env.type="{envs}:SecondThoughts"', "rollout.env.max_turns=2",
                             "rollout.env.max_episode_tokens=512"])
    assert cfg.rollout.env.type == f"{envs}:SecondThoughts"
    with pytest.raises(ConfigError, match=r"rollout\.env\.type: .*'no_such_pkg_xyz\.envs' cannot be imported"):
        load_config(None, ['rollout.env.type="no_such_pkg_xyz.envs:Game"'])


def test_bad_environment_types_are_one_line_errors_naming_the_value_and_the_fix(user_modules):
    envs, _ = user_modules

    def err(type_: str) -> str:
        with pytest.raises(ValidationError) as e:
            EnvConfig(type=type_, max_turns=2)
        msg = e.value.errors()[0]["msg"]
        assert "\n" not in msg
        return msg

    assert "'chess' has no registered environment (registered: openenv, single_turn, textarena, tool_math; or an " \
           "import path 'pkg.module:Class'" in err("chess")
    assert "module 'no_such_pkg_xyz' cannot be imported" in err("no_such_pkg_xyz:Game")
    assert "has no attribute 'Chess'" in err(f"{envs}:Chess")
    assert "not a subclass of rollout.envs.Environment; subclass it" in err(f"{envs}:NotAnEnvironment")
    assert "not a subclass of rollout.envs.Environment" in err(f"{envs}:not_a_class")
    assert "not a subclass" in err("rollout.envs:Environment")  # the protocol itself is no environment
    assert "Incomplete leaves step abstract; define them" in err(f"{envs}:Incomplete")


def test_builtin_environments_carry_their_own_worker_settings():
    """What `RolloutWorker` used to special-case by name now sits in the environments' hooks."""
    rc, data = RolloutConfig(max_tokens=300, reward_timeout_s=40.0), DataConfig(instruction="Go.", one_shot=False)
    st = SingleTurn.worker_config(EnvConfig(), rc, data)
    assert st.options == {"instruction": "Go.", "one_shot": False, "system_prompt": ""}
    assert st.max_episode_tokens == max(EnvConfig().max_episode_tokens, 300) and st.step_timeout_s == 85.0
    own = SingleTurn.worker_config(EnvConfig(options={"instruction": "Mine."}), rc, data)
    assert own.options["instruction"] == "Mine."  # the environment's own options win over the data section
    tm = EnvConfig(type="tool_math", max_turns=2)
    assert ToolMath.worker_config(tm, rc, data) is tm  # the default hook: as configured


def test_user_code_dirs_reach_the_actors_and_installed_code_is_left_out(user_modules, tmp_path):
    envs, rewards = user_modules
    environment_class(f"{envs}:SecondThoughts")
    RewardConfig(fn=f"{rewards}:length_reward")
    assert code_roots([f"{rewards}:length_reward", f"{envs}:SecondThoughts", "exact_match", "single_turn"]) == [
        str(tmp_path.resolve())]
    RewardConfig(fn="trl.rewards:think_format_reward")
    assert code_roots(["trl.rewards:think_format_reward", "json:dumps"]) == []  # every worker has installed code


def _answers(texts: list[str]):
    """A scripted sampler: the episodes' turns, in order."""
    at = [0]

    def sample(prompts, n, budget):
        outs = []
        for k in n:
            outs.append([Completion([5, 6], [-0.1, -0.1], texts[at[0] + j], "stop") for j in range(k)])
            at[0] += k
        return outs, [[[0] * 2 for _ in g] for g in outs]
    return sample


def test_each_rewards_part_travels_from_the_answer_to_the_step_metrics(user_modules, enc):
    """answer_step -> StepResult.info -> Episode.reward_terms -> RolloutResult.reward_terms -> rollout/reward/*."""
    from orchestrator.tally import RolloutTally
    from rollout.worker import _reward_terms

    _, rewards = user_modules
    rs = RewardSet([RewardConfig(fn="exact_match", weight=2.0), RewardConfig(fn=f"{rewards}:length_reward"),
                    RewardConfig(fn=f"{rewards}:numeric_only", weight=0.5)], 5.0)
    problems = [PROBLEM, Problem("train/1", "Name a colour.", "red")]
    cfg = EnvConfig()
    eps = [[Episode(make_environment(cfg, p, lambda t, r, p=p: rs.score(p.question, t, r))) for _ in range(2)]
           for p in problems]
    run_episodes(eps, [0, 1], _answers(["Answer: 5", "Answer: 4", "Answer: red", "blue"]), enc, cfg, 8, 512)
    flat = [e for g in eps for e in g]
    assert [e.reward for e in flat] == pytest.approx([2 + 0.9 + 0.5, 0.9 + 0.5, 2 + 1.1, 0.4])
    assert [e.correct for e in flat] == [True, False, True, False]
    assert flat[2].reward_terms == {"exact_match": 1.0, "length_reward": 1.1, "numeric_only": None}
    terms = _reward_terms(flat)
    assert terms == (("exact_match", 2.0, 4, 0), ("length_reward", pytest.approx(3.3), 4, 0),
                     ("numeric_only", 2.0, 2, 0))
    tally = RolloutTally(0.5)
    tally.add(RolloutResult(0, (), (), 4, 8, 0, 0, 0.0, reward_terms=terms))
    tally.add(RolloutResult(1, (), (), 2, 4, 2, 0, 0.0, reward_terms=(("exact_match", 0.0, 0, 2),
                                                                        ("length_reward", 1.0, 1, 0))))
    m = tally.step_metrics(1.0, 1)
    assert m["rollout/reward/exact_match"] == pytest.approx(2.0 / 4)  # sample-weighted across workers
    assert m["rollout/reward/length_reward"] == pytest.approx(4.3 / 5)
    assert m["rollout/reward/numeric_only"] == 1.0
    assert m["rollout/reward_failures/exact_match"] == 2.0 and m["rollout/reward_failures/numeric_only"] == 0.0
    assert not any(k.startswith("rollout/reward/") for k in tally.step_metrics(1.0, 1))  # per step: reset
    none_applied = RolloutTally(0.5)
    none_applied.add(RolloutResult(0, (), (), 1, 1, 0, 0, 0.0, reward_terms=(("numeric_only", 0.0, 0, 0),)))
    assert math.isnan(none_applied.step_metrics(1.0, 1)["rollout/reward/numeric_only"])


def test_a_failed_reward_function_fails_the_episode_and_is_counted_under_its_name(user_modules, enc, tmp_path):
    from rollout.worker import _reward_terms

    (tmp_path / "flaky_reward_mod.py").write_text("def flaky(completions, **kw):\n    raise KeyError('x')\n")
    rs = RewardSet([RewardConfig(fn="exact_match"), RewardConfig(fn="flaky_reward_mod:flaky")], 5.0)
    cfg = EnvConfig()
    eps = [[Episode(make_environment(cfg, PROBLEM, lambda t, r: rs.score(PROBLEM.question, t, r)))]]
    run_episodes(eps, [0], _answers(["Answer: 5"]), enc, cfg, 8, 512)
    e = eps[0][0]
    assert e.status == "failed" and e.reward_error == "reward 'flaky' raised KeyError: 'x'" and e.reward == 0.0
    assert _reward_terms([e]) == (("exact_match", 1.0, 1, 0), ("flaky", 0.0, 0, 1))
    sys.modules.pop("flaky_reward_mod", None)
