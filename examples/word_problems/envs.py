"""The example's environment: a word problem with a second chance. A wrong first answer gets "That is not right"
back and one more try, worth ``retry_weight`` of the reward. Not used by ``config.toml`` (a single answer per
problem, relayrl's built-in ``single_turn``); select it with

    relayrl train examples/word_problems/config.toml rollout.env.type=examples.word_problems.envs:SecondChance \
        rollout.env.max_turns=2 rollout.env.max_episode_tokens=192

Scoring is the run's own: ``self.score`` runs the config's ``[[rollout.rewards]]`` (this folder's `rewards`) on
the rollout worker, under ``rollout.reward_timeout_s``.

Left out on purpose: hints about the right number (the model would learn to wait for them).
"""

from __future__ import annotations

from typing import Any

from rollout.envs import Environment, Message, StepResult

DEMO_QUESTION = "Lia has 4 bags with 3 pears in each bag. How many pears does Lia have?"
DEMO_ANSWER = "4 x 3 = 12.\nAnswer: 12"
INSTRUCTION = "Show brief work, then give the final line as 'Answer: <number>'."
RETRY = "That is not right. Check your work and answer again, with the final line 'Answer: <number>'."


class SecondChance(Environment):
    """One word problem (``problem.question``), up to two answers; ``rollout.env.max_turns`` must be 2.

    Turn 1: the run's reward for the answer; a right answer (relayrl's strict exact match, what held-out
    accuracy counts) ends the episode. A wrong one gets `RETRY` back (reward 0 for that turn). Turn 2:
    ``retry_weight`` x the run's reward, and the episode ends either way.

    Options: ``retry_weight`` (float in [0, 1], default 0.5), ``instruction`` (str, appended to the question).

    Raises:
        ValueError: an unknown option or a ``retry_weight`` outside [0, 1] (names it).
    """

    def __init__(self, problem, options: dict[str, Any], cfg) -> None:
        super().__init__(problem, options, cfg)
        known = {"retry_weight": 0.5, "instruction": INSTRUCTION}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"rollout.env.options for SecondChance: unknown key(s) {unknown}; accepted: {sorted(known)}")
        self.opts = {**known, **options}
        if not 0.0 <= float(self.opts["retry_weight"]) <= 1.0:
            raise ValueError(f"rollout.env.options.retry_weight = {self.opts['retry_weight']!r}: must be in [0, 1]")
        self.turn = 0  # answers given so far

    def reset(self, seed: int) -> list[Message]:
        """A worked demo of the answer format, then the problem (the seed is unused: the problem is the episode)."""
        self.turn = 0
        instruction = self.opts["instruction"]
        return [{"role": "user", "content": f"{DEMO_QUESTION}\n{instruction}"},
                {"role": "assistant", "content": DEMO_ANSWER},
                {"role": "user", "content": f"{self.problem.question}\n{instruction}"}]

    def step(self, action: str) -> StepResult:
        self.turn += 1
        score = self.score(action, self.problem.answer)  # (reward, correct, error), a rollout.rewards.Score
        reward, correct, error = score
        if error:  # a reward function failed: the episode is kept, counted, never trained on
            return StepResult([], 0.0, True, {"correct": False, "reward_error": error})
        if not correct and self.turn == 1:
            return StepResult([{"role": "user", "content": RETRY}], 0.0, False, {"correct": False})
        scale = 1.0 if self.turn == 1 else float(self.opts["retry_weight"])
        info: dict[str, Any] = {"correct": correct, "turns": self.turn}
        if getattr(score, "terms", None):  # each reward function's value, for rollout/reward/<name>
            info.update(reward_terms=dict(score.terms), reward_failed=list(score.failed))
        return StepResult([], scale * reward, True, info)
