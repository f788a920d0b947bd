"""The driver: run config, the async loop, placement, weight sync, scaling, checkpoints, metrics, CLI.

`orchestrator.loop.Trainer` owns one run's actors and composes the pieces that each own one concern:
`buffer.StalenessManager` (admission), `orchestrator.dispatch.Dispatcher` (generate requests),
`orchestrator.weight_sync.WeightSync` (weight pushes over a transport of `orchestrator.weights`, chosen by
``weights.type``), `orchestrator.scaling.Scaler` (manual and automatic scaling, worker recovery),
`orchestrator.tally.RolloutTally` (rollout counters), `orchestrator.clock.RunClock` (training clocks and totals),
`orchestrator.checkpoint` (save / resume), `orchestrator.metrics` (JSONL, TensorBoard, W&B).
`orchestrator.config.RunConfig` composes each package's config; `orchestrator.cli` is the `relayrl`
command; `tooling` holds benchmarks, experiments, reports and the TRL baseline, which the
core never imports. Depends on rollout/, learner/, buffer/ and base/; only tooling/ depends on it.
"""

__all__ = ["train"]


def train(*args, **kwargs):
    """`orchestrator.loop.train` (imported on first use, so ``import orchestrator`` stays light)."""
    from orchestrator.loop import train as _train

    return _train(*args, **kwargs)
