"""`RolloutTally`: the driver's rollout counters per step and per run, and the reward-failure budget.

Every `RolloutResult` the driver collects is added here; a learner step turns the counters since the
previous step into ``rollout/*``, ``curation/*`` and ``perf/*`` metrics and starts them afresh.

Left out on purpose: per-sample records (the buffer and the learner report those).
"""

from __future__ import annotations

from buffer import RolloutResult


class RolloutTally:
    """Counters of generated groups and samples, reward failures and worker faults.

    Args:
        max_reward_failure_frac: largest fraction of scored samples whose reward function may fail
            (checked from the first finished step on).
    """

    def __init__(self, max_reward_failure_frac: float) -> None:
        self.max_reward_failure_frac = max_reward_failure_frac
        # since the last step: groups, zero-variance groups, samples, samples spanning versions
        self.groups = self.zero_variance = self.samples = self.mixed_version = 0
        self.tokens, self.load_seconds = 0, 0.0  # response tokens generated, seconds loading weights
        self.env_failures = self.tool_failures = self.turns = 0  # episodes (multi-turn rollout.env)
        self.worker_samples: dict[int, int] = {}  # samples per rollout worker since the last step
        self.reward_terms: dict[str, list] = {}  # reward name -> [sum, samples applied, samples failed] since then
        # since the start of the run
        self.samples_total = self.reward_failures = self.retried_groups = self.worker_restarts = 0
        self.worker_restarts_hung = 0  # of worker_restarts, those of a hung worker (orchestrator.dispatch)

    def add(self, result: RolloutResult) -> None:
        """Count one finished generate request."""
        self.groups += len(result.group_rewards)
        self.zero_variance += sum(len(r) < 2 or max(r) - min(r) < 1e-6 for _, r in result.group_rewards)
        self.samples += result.samples
        self.samples_total += result.samples
        self.mixed_version += result.mixed_version_samples
        self.reward_failures += result.reward_failures
        self.tokens += result.tokens
        self.env_failures += result.env_failures
        self.tool_failures += result.tool_failures
        self.turns += result.turns
        self.load_seconds += result.load_seconds
        self.worker_samples[result.worker] = self.worker_samples.get(result.worker, 0) + result.samples
        for name, total, applied, failed in result.reward_terms:
            t = self.reward_terms.setdefault(name, [0.0, 0, 0])
            t[0], t[1], t[2] = t[0] + total, t[1] + applied, t[2] + failed

    def check_reward_failures(self, version: int) -> None:
        """Stop the run when too many samples failed their reward function.

        Raises:
            RuntimeError: after the first step, more than ``max_reward_failure_frac`` of the samples
                scored so far failed.
        """
        limit = self.max_reward_failure_frac
        if version >= 1 and self.reward_failures > limit * self.samples_total:
            raise RuntimeError(
                f"{self.reward_failures} of {self.samples_total} samples failed their reward function (more than "
                f"rollout.max_reward_failure_frac = {limit:g}); the rollout worker logs name each failure")

    def step_metrics(self, elapsed_s: float, trained_samples_total: int) -> dict[str, float]:
        """Metrics of the step that took ``elapsed_s`` seconds; resets the per-step counters.

        Per reward function ``<name>`` of ``rollout.rewards``: ``rollout/reward/<name>``, the mean of its
        unweighted values over the step's generated samples it applied to, across workers (sum / count; NaN
        when it applied to none), and ``rollout/reward_failures/<name>``, the samples it failed (sum)."""
        m = {
            "perf/rollout_tokens_per_s": self.tokens / max(elapsed_s, 1e-9),
            "weights/load_seconds": self.load_seconds,
            "rollout/reward_failed_frac": self.reward_failures / max(self.samples_total, 1),
            "rollout/retried_groups": float(self.retried_groups),
            "rollout/worker_restarts": float(self.worker_restarts),  # run totals, over all workers (sum)
            "rollout/worker_restarts_hung": float(self.worker_restarts_hung),
            "rollout/mixed_version_frac": self.mixed_version / max(self.samples, 1),
            "rollout/env_failed_frac": self.env_failures / max(self.samples, 1),
            "rollout/tool_failures": float(self.tool_failures),
            "rollout/turns_per_sample": self.turns / max(self.samples, 1),
            "curation/groups_generated": float(self.groups),
            "curation/zero_variance_generated_frac": self.zero_variance / self.groups if self.groups else 0.0,
            "curation/rollouts_per_trained_sample": self.samples_total / max(trained_samples_total, 1),
            **{f"rollout/worker_{w}_samples_per_s": n / max(elapsed_s, 1e-9)
               for w, n in sorted(self.worker_samples.items())},
            **{f"rollout/reward/{name}": total / applied if applied else float("nan")
               for name, (total, applied, _) in sorted(self.reward_terms.items())},
            **{f"rollout/reward_failures/{name}": float(failed)
               for name, (_, _, failed) in sorted(self.reward_terms.items())},
        }
        self.groups = self.zero_variance = self.samples = self.mixed_version = self.tokens = 0
        self.env_failures = self.tool_failures = self.turns = 0
        self.load_seconds, self.worker_samples, self.reward_terms = 0.0, {}, {}
        return m

    def state_dict(self) -> dict:
        """Run totals (the per-step counters start afresh after a resume)."""
        return {"samples_total": self.samples_total, "reward_failures": self.reward_failures,
                "retried_groups": self.retried_groups, "worker_restarts": self.worker_restarts,
                "worker_restarts_hung": self.worker_restarts_hung}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict`."""
        self.samples_total, self.reward_failures = int(state["samples_total"]), int(state["reward_failures"])
        self.retried_groups, self.worker_restarts = int(state["retried_groups"]), int(state["worker_restarts"])
        self.worker_restarts_hung = int(state.get("worker_restarts_hung", 0))  # absent from older checkpoints
