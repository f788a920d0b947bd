"""``openenv``: an OpenEnv environment server (Meta's `openenv-core` standard) as a relayrl environment.

An OpenEnv environment is an HTTP/WebSocket server (``reset``, ``step(action)``, ``state``) whose actions and
observations are typed records; it runs wherever its own dependencies live (a Docker image, a Hugging Face
Space, ``uvicorn server.app:app`` on a worker node). Each episode here opens one WebSocket session to
``base_url`` with `openenv`'s generic client, which speaks plain dicts, so no environment-specific package
is installed on the rollout workers. The assistant's text becomes one field of the action
(``{action_field: text}``); the observation record becomes the next user message (one field's value, or
every field as ``name: value`` lines). Reward: the server's reward for each step (None counts as 0).

The server decides how many sessions it holds at once (``max_concurrent_envs`` in its ``create_app``);
size it for ``rollout.group_size`` times the episodes in flight, or sessions beyond it are refused.

Left out on purpose: starting servers (from Docker images or Hub Spaces: the run names one already up),
in-process environments (their typed action classes would be imported by path) and MCP tool environments.
`openenv-core` has an extra of its own, ``openenv`` (``make install`` installs it): its ``gradio`` dependency
caps pillow below 13, so it downgrades pillow to 12.3 (vLLM asks for >= 12.3).
"""

from __future__ import annotations

import json
from typing import Any

from rollout.envs.base import Environment, Message, StepResult, check_options, register_environment


def _generic_client():
    try:
        from openenv.core.generic_client import GenericEnvClient
    except ImportError as e:
        raise ValueError(f"rollout.env.type = 'openenv' needs the openenv-core package ({e}); install it with: "
                         "pip install 'relayrl[openenv]' (openenv-core 0.3.0; it downgrades pillow to < 13)") from e
    return GenericEnvClient


def observation_text(observation: dict[str, Any], field: str) -> str:
    """The user message for an OpenEnv observation record (its ``reward``/``done``/``metadata`` left out).

    Args:
        observation: the observation as the server sent it (a JSON object).
        field: the one field to show; empty: every field as ``name: value`` lines (non-strings as JSON).

    Raises:
        ValueError: ``field`` is not in the observation (the message names the fields it has).
    """
    if field:
        if field not in observation:
            raise ValueError(f"rollout.env.options.observation_field = {field!r} is not in the OpenEnv observation "
                             f"(fields: {sorted(observation)})")
        value = observation[field]
        return value if isinstance(value, str) else json.dumps(value)
    return "\n".join(f"{k}: {v if isinstance(v, str) else json.dumps(v)}" for k, v in observation.items()
                     if k not in ("reward", "done", "metadata"))


@register_environment("openenv")
class OpenEnv(Environment):
    """One session with an OpenEnv server per episode.

    Options: ``base_url`` (str, required: the server, e.g. ``http://10.0.0.5:8000``), ``action_field`` (str,
    the action field that carries the assistant's text; default ``message``), ``action_extra`` (dict, fixed
    fields sent with every action; default none), ``observation_field`` (str, the observation field shown to
    the model; default empty: all fields), ``instruction`` (str appended to the opening message; default
    empty), ``connect_timeout_s`` (float, seconds to open the session; default 10).

    Raises:
        ValueError: openenv-core is not installed, ``base_url`` is missing, or an option is unknown.
    """

    def __init__(self, problem, options: dict[str, Any], cfg) -> None:
        super().__init__(problem, options, cfg)
        self.opts = check_options("openenv", options, {
            "base_url": "", "action_field": "message", "action_extra": {}, "observation_field": "",
            "instruction": "", "connect_timeout_s": 10.0})
        if not self.opts["base_url"]:
            raise ValueError("rollout.env.type = 'openenv' needs rollout.env.options.base_url, the URL of a running "
                             "OpenEnv server (e.g. 'http://localhost:8000')")
        client_cls = _generic_client()
        self.client = client_cls(base_url=str(self.opts["base_url"]),
                                 connect_timeout_s=float(self.opts["connect_timeout_s"]),
                                 message_timeout_s=float(cfg.step_timeout_s)).sync()

    def reset(self, seed: int) -> list[Message]:
        """The server's first observation (plus ``instruction``) as one user message; ``seed`` goes to the
        server's reset (environments that take a seed replay the same episode for it).

        Raises:
            ConnectionError / RuntimeError (from openenv): the server is unreachable or refused the session.
        """
        result = self.client.reset(seed=int(seed))
        text = observation_text(result.observation, str(self.opts["observation_field"]))
        extra = str(self.opts["instruction"])
        return [{"role": "user", "content": f"{text}\n{extra}".strip()}]

    def step(self, action: str) -> StepResult:
        """Send ``{action_field: action, **action_extra}``; the observation comes back as one user message.

        Raises:
            RuntimeError: the server refused the action (e.g. no field ``action_field``); the message names it.
        """
        payload = {**dict(self.opts["action_extra"]), str(self.opts["action_field"]): action}
        try:
            result = self.client.step(payload)
        except RuntimeError as e:
            raise RuntimeError(f"OpenEnv server {self.opts['base_url']} refused the action with fields "
                               f"{sorted(payload)} (rollout.env.options.action_field / action_extra): {e}") from e
        reward = float(result.reward or 0.0)
        if result.done:
            return StepResult([], reward, True, {})
        text = observation_text(result.observation, str(self.opts["observation_field"]))
        return StepResult([{"role": "user", "content": text}], reward, False, {})

    def close(self) -> None:
        """End the WebSocket session (the server drops its environment instance)."""
        self.client.close()
