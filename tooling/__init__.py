"""relayrl's tooling: benchmarks, experiments, reports and the TRL baseline: built on the core, never imported by it.

- `bench` (with `bench_session`, `bench_generation`, `bench_delta`, `bench_training`, `bench_memory`, `bench_layouts`,
  `bench_actors`, `bench_math`): ``relayrl bench``,
  relayrl's overheads and overlap on a run config.
- `experiment`: ``relayrl experiment``, named variants of one config and their comparison table.
- `report`: ``relayrl report``, plots and a one-page summary of a run dir.
- `trl_baseline`: ``relayrl trl-baseline``, TRL's GRPOTrainer on a relayrl run config.
- `config_reference`: ``relayrl config-reference``, docs/config.md generated from the config models.
- `sentinel_gap`: ``python -m tooling.sentinel_gap``, the learner-engine logprob gap the sentinel bounds,
  measured outside a run (where ``sentinel.*`` defaults come from).

Each is a module of its own, imported where it is used (`orchestrator.cli` imports them inside its
subcommand functions): they pull in Ray, vLLM, matplotlib or TRL, so this package imports none of
them. Dependencies point one way: tooling -> {orchestrator, rollout, learner, buffer, base}; an import-linter
contract (pyproject.toml) keeps the core from importing tooling.
"""

__all__ = [
    "bench", "bench_actors", "bench_delta", "bench_generation", "bench_layouts", "bench_math", "bench_memory",
    "bench_session", "bench_training", "config_reference",
    "experiment", "report", "sentinel_gap", "trl_baseline",
]
