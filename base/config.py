"""`StrictConfig`: the base every relayrl config section derives from.

It lives in the lowest package because every package has a config section; each package's own
config sits beside it (`buffer.config`, `rollout.config`, `learner.config`, `orchestrator.config`) and
`orchestrator.config.RunConfig` composes them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    """Base of every relayrl config section: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)
