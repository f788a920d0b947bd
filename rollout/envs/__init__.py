"""Environments for multi-turn episodes: the `Environment` protocol, its registry (``rollout.env.type``),
tool calls and the sandbox they run in.

`rollout.episode` runs episodes token in, token out; `rollout.worker` turns them into `buffer.Sample` s.
Built in: ``single_turn``, ``tool_math`` (`rollout.envs.builtin`); ``textarena`` (`rollout.envs.textarena_env`);
``openenv`` (`rollout.envs.openenv_env`). A user's own `Environment` subclass is named by import path,
``rollout.env.type = "pkg.module:Class"`` (`environment_class`).

Importing this package is light: environments' own packages load when an environment is made.
"""

from rollout.envs.base import (ENVIRONMENTS, Environment, Message, StepResult, environment_class, make_environment,
                               register_environment)
from rollout.envs.config import EnvConfig, SandboxConfig
from rollout.envs.sandbox import ToolResult, check_sandbox, run_python
from rollout.envs.tools import ToolCall, parse_tool_calls, run_tool_call

__all__ = ["ENVIRONMENTS", "EnvConfig", "Environment", "Message", "SandboxConfig", "StepResult", "ToolCall",
           "ToolResult", "check_sandbox", "environment_class", "make_environment", "parse_tool_calls",
           "register_environment", "run_python", "run_tool_call"]
