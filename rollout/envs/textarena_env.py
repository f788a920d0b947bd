"""``textarena``: the single-player games of the `textarena` package (GuessTheNumber, Mastermind, FrozenLake,
...) as relayrl environments.

The game is made in its ``-raw`` variant (no textarena wrapper): textarena's own wrappers re-send the whole
history every turn, while an episode here appends only what is new, so each observation is the game's
messages since the last action (its echo of the action left out), as one user message. The game's reset
seed is the episode's (a GRPO group plays one game). Reward: 0 on every turn but the last, then the game's
own reward for player 0 (1 for a win; some games give partial credit, GuessTheNumber for a close last
guess); ``correct`` only for a reward >= 1.

textarena seeds Python's global ``random`` in ``reset`` and some games draw from it in ``step``, so calls
into textarena hold one process-wide lock (they take microseconds; generation is not held).

Left out on purpose: multi-player games (an episode here has one learning player) and games whose
resources are downloaded at first use (NLTK corpora: Wordle, Hangman, ...), which fail offline in ``reset``.
"""

from __future__ import annotations

import threading
from typing import Any

from rollout.envs.base import Environment, Message, StepResult, check_options, register_environment

_LOCK = threading.Lock()


def _textarena():
    try:
        import textarena
    except ImportError as e:
        raise ValueError(f"rollout.env.type = 'textarena' needs the textarena package ({e}); "
                         "install it with: pip install 'relayrl[envs]'") from e
    return textarena


@register_environment("textarena")
class TextArena(Environment):
    """One textarena single-player game per episode.

    Options: ``env_id`` (str, a textarena id such as ``GuessTheNumber-v0``; default that one),
    ``env_kwargs`` (dict, overrides of the game's registered arguments, e.g. ``{max_turns = 6}``),
    ``instruction`` (str appended to the game's opening prompt; default empty).

    Raises:
        ValueError: textarena is not installed, ``env_id`` is not one of its games, or the game is not
            single-player (the message names the id and how to list the known ones).
    """

    def __init__(self, problem, options: dict[str, Any], cfg) -> None:
        super().__init__(problem, options, cfg)
        self.opts = check_options("textarena", options, {"env_id": "GuessTheNumber-v0", "env_kwargs": {},
                                                         "instruction": ""})
        ta = _textarena()
        env_id = str(self.opts["env_id"])
        base = env_id.removesuffix("-raw")
        if base + "-raw" not in ta.envs.registration.ENV_REGISTRY:
            raise ValueError(f"rollout.env.options.env_id = {env_id!r} is not a textarena game; list them with "
                             "python -c 'import textarena; print(sorted(textarena.envs.registration.ENV_REGISTRY))'")
        with _LOCK:
            self.game = ta.make(base + "-raw", **dict(self.opts["env_kwargs"]))
        self.env_id = base

    def _observation(self) -> str:
        _, obs = self.game.get_observation()
        from textarena.core import ObservationType

        return "\n".join(msg for _, msg, kind in obs if kind != ObservationType.PLAYER_ACTION).strip()

    def reset(self, seed: int) -> list[Message]:
        """The game's opening prompt (plus ``instruction``) as one user message; ``seed`` fixes the game.

        Raises:
            ValueError: the game is not single-player (its reset refuses one player).
        """
        with _LOCK:
            try:
                self.game.reset(num_players=1, seed=int(seed))
            except ValueError as e:
                raise ValueError(f"textarena game {self.env_id!r} cannot be played by one player: {e}") from e
            text = self._observation()
        extra = str(self.opts["instruction"])
        return [{"role": "user", "content": f"{text}\n{extra}".strip()}]

    def step(self, action: str) -> StepResult:
        """The action goes to the game as is (textarena games parse it, e.g. ``[7]``); the game's messages come
        back. ``info``: ``correct`` (won), ``reason`` (the game's end reason, on the last turn)."""
        with _LOCK:
            done, _ = self.game.step(action)
            if not done:
                return StepResult([{"role": "user", "content": self._observation()}], 0.0, False, {})
            rewards, game_info = self.game.close()
        reward = float(rewards.get(0, 0.0)) if rewards else 0.0
        reason = str((game_info or {}).get(0, {}).get("reason", ""))
        return StepResult([], reward, True, {"correct": reward >= 1.0, "reason": reason})
