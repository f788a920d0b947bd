"""The learner: DeepSpeed (ZeRO) training ranks as Ray actors, and the math they run.

`LearnerGroup` creates N `LearnerWorker` ranks and fans calls out to them (training steps, weight
export and broadcast, checkpoints). A training step turns a batch of `buffer.Sample` groups into
advantages (`ADVANTAGE_ESTIMATORS`, keyed by ``learner.advantage.type``), splits it over ranks, PPO
minibatches and micro-batches (`plan_microbatches`), leaves out samples whose advantage is 0 (their
gradient is 0: `learner.batching.restrict_plan`), scores each micro-batch's responses in one
forward, the samples of a prompt sharing its encoding (`learner.step.response_logprobs`), and
applies a policy loss (`POLICY_LOSSES`, keyed by ``learner.loss.type``) with off-policy corrections
(`learner.off_policy`). Each loss and estimator is a config class (its ``type`` and knobs) plus a pure
function, in one registry; ``learner.loss`` / ``learner.advantage`` are the tagged unions of those classes.
Each rank returns its step's metrics as `Metrics`, every key declaring where it is produced how it
combines across ranks (`Reduce`); `LearnerGroup.merge_metrics` applies the declarations.
`LearnerConfig` (`learner.config`) is this package's section of the run config. Depends on buffer/ and
base/ only.

The names below load on first use, so ``import learner`` pulls in none of torch, DeepSpeed or Ray
(config validation and ``--help`` stay fast).

Left out on purpose: rollout generation (`rollout`), sample storage and staleness accounting
(`buffer`), placement and the training loop (`orchestrator`).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "LearnerConfig": "learner.config",
    "LearnerGroup": "learner.group",
    "LearnerWorker": "learner.worker",
    "ADVANTAGE_ESTIMATORS": "learner.advantages",
    "batch_advantages": "learner.advantages",
    "POLICY_LOSSES": "learner.losses",
    "PolicyLossInput": "learner.losses",
    "policy_loss": "learner.losses",
    "Metrics": "learner.metrics",
    "Reduce": "learner.metrics",
    "plan_microbatches": "learner.batching",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Import an exported name's module on first access (PEP 562)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'learner' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
