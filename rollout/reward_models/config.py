"""The ``[[reward_models]]`` config: one pydantic model per kind of pool, chosen by ``type``
(`ClassifierRewardModelConfig`, `JudgeRewardModelConfig`; `RewardModelConfig` is their tagged union), the run-level
rules between pools and ``rollout.rewards`` (`check_reward_models`), and the names callers use (`ENV_VAR`,
`REWARD_MODEL_PREFIX`).

Templates and verdict patterns are checked when a config loads (`rollout.reward_models.text`); models are not
(a pool's server loads its model when it starts).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from base.config import StrictConfig, tagged_union
from rollout.reward_models.text import VerdictParser, template_fields

ENV_VAR = "RELAYRL_REWARD_MODELS"
"""Environment variable naming the run's pools for the processes that call them (JSON, `reward_models_env`)."""

REWARD_MODEL_PREFIX = "reward_model:"
"""``rollout.rewards[].fn = "reward_model:<name>"``: the built-in reward that scores with pool ``<name>``."""

DEFAULT_JUDGE_TEMPLATE = ("Rate how well the response answers the question, from 0 (wrong or useless) to 10 "
                          "(correct and complete).\n\nQuestion: {prompt}\n\nResponse: {completion}\n\n"
                          "Reply with the rating only.")


class _RewardModelBase(StrictConfig):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
                      description="the pool's name: rollout.rewards fn = 'reward_model:<name>', "
                      "reward_model('<name>') in user code, metrics reward_model/<name>/*")
    model: str = Field(description="the model: an HF model dir, a storage URI of one, a hub name (when online) or "
                       "'smollm2-135m-instruct' (as model.path)")
    num_workers: int = Field(1, ge=1, le=256, description="server actors of the pool at start")
    num_cpus: float = Field(1.0, gt=0.0, le=1024.0, description="CPUs reserved per server (also its torch threads)")
    num_gpus: float = Field(0.0, ge=0.0, le=64.0, description="GPUs per server (0 on CPU)")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per server")
    node_labels: dict[str, str] = Field(default_factory=dict, description="node labels a server's node must have")
    timeout_s: float = Field(8.0, gt=0.0, le=3600.0, description="max seconds a caller waits for one score call "
                             "(from when it is sent); past it the call's items score None, counted as failures; "
                             "below rollout.reward_timeout_s when a rollout.rewards entry uses the pool")
    batch_size: int = Field(16, ge=1, le=4096, description="max items a server scores in one batch (one forward "
                            "or one engine call); concurrent calls are batched together up to this")
    batch_wait_s: float = Field(0.005, ge=0.0, le=10.0, description="seconds a server waits for more items "
                                "before it runs a batch that is not full")
    max_restarts: int = Field(3, ge=0, le=1000, description="Ray restarts per server")

    @field_validator("template", check_fields=False)
    @classmethod
    def _plain_fields(cls, template: str | None) -> str | None:
        if template is not None:
            template_fields(template)
        return template


class ClassifierRewardModelConfig(_RewardModelBase):
    """A sequence-classification reward model (transformers ``AutoModelForSequenceClassification``)."""

    type: Literal["classifier"] = "classifier"
    template: str | None = Field(
        None, description="the scored text, a str.format template of {prompt}, {completion} and the sample's "
        "columns; None: the tokenizer's chat template over [user: prompt, assistant: completion] (prompt + "
        "completion without one)")
    label: int | str | None = Field(None, description="the label scored: an index or a name of the model's "
                                    "id2label; None: the only logit of a one-label model")
    output: Literal["logit", "probability"] = Field(
        "logit", description="the score: the label's logit, or its probability (softmax over the labels; sigmoid "
        "of a one-label model)")
    max_length: int = Field(2048, ge=8, le=131072, description="tokens per scored text (longer ones are truncated)")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="torch dtype of the model")


class JudgeRewardModelConfig(_RewardModelBase):
    """A generative judge: a vLLM engine answers a prompt about the sample; a regex reads the verdict."""

    type: Literal["judge"] = "judge"
    template: str = Field(DEFAULT_JUDGE_TEMPLATE, min_length=1, description="the judge's prompt, a str.format "
                          "template of {completion}, {prompt} and the sample's columns ({answer}, ...), sent as one "
                          "user turn of the model's chat template")
    chat: bool = Field(True, description="apply the model's chat template (false: the rendered text as it is)")
    pattern: str = Field(r"(-?\d+(?:\.\d+)?)", min_length=1, description="regex with one capture group: the "
                         "verdict in the judge's answer (a number, or a key of verdicts)")
    verdicts: dict[str, float] = Field(default_factory=dict, description="captured text (case-insensitive) -> "
                                       "score, e.g. {yes = 1.0, no = 0.0}; empty: the captured text is a number")
    match: Literal["first", "last"] = Field("first", description="which match of pattern in the answer counts")
    max_tokens: int = Field(16, ge=1, le=8192, description="max tokens of the judge's answer")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="sampling temperature of the judge (0: greedy)")
    seed: int = Field(0, description="sampling seed of the judge")
    dtype: Literal["bfloat16", "float32", "float16"] = Field("bfloat16", description="vLLM dtype")
    kv_cache_memory_bytes: int = Field(256 << 20, ge=16 << 20, description="vLLM KV cache size in bytes on CPU")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="CUDA: fraction of each GPU's memory "
                                          "the judge's engine may use; unused on CPU")
    max_model_len: int = Field(2048, ge=64, le=131072, description="judge prompt + answer tokens, max (a longer "
                               "prompt scores None)")

    @model_validator(mode="after")
    def _parser_compiles(self) -> JudgeRewardModelConfig:
        try:
            VerdictParser(self.pattern, self.verdicts, self.match)
        except ValueError as e:
            raise ValueError(f"reward_models {self.name!r}: {e}") from None
        if "completion" not in template_fields(self.template):
            raise ValueError(f"reward_models {self.name!r}: the judge's template has no {{completion}} field, so the "
                             "judge never sees what it scores; add {completion}")
        return self


REWARD_MODEL_TYPES = (ClassifierRewardModelConfig, JudgeRewardModelConfig)
RewardModelConfig = tagged_union("reward_models[]", list(REWARD_MODEL_TYPES), ClassifierRewardModelConfig)
"""One ``[[reward_models]]`` entry: a classifier or a judge, chosen by ``type``."""


def check_reward_models(reward_models: Sequence[Any], rewards: Sequence[Any], reward_timeout_s: float) -> None:
    """The run-level rules (`orchestrator.config.RunConfig`): pool names differ; each ``reward_model:<name>``
    reward names a pool; that pool's ``timeout_s`` is below ``rollout.reward_timeout_s`` (which bounds the whole
    reward call).

    Raises:
        ValueError: one line naming the field and the fix.
    """
    names = [r.name for r in reward_models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"reward_models: name(s) {twice} given to more than one pool; give each a distinct name")
    for i, r in enumerate(rewards):
        if not r.fn.startswith(REWARD_MODEL_PREFIX):
            continue
        name = r.fn[len(REWARD_MODEL_PREFIX):]
        if name not in names:
            raise ValueError(f"rollout.rewards[{i}].fn = {r.fn!r} names no [[reward_models]] entry (have: "
                             f"{names or 'none'}); add one with name = {name!r} or fix the name")
        pool = reward_models[names.index(name)]
        if pool.timeout_s >= reward_timeout_s:
            raise ValueError(f"reward_models {name!r}: timeout_s = {pool.timeout_s:g} is not below "
                             f"rollout.reward_timeout_s = {reward_timeout_s:g}, which bounds rollout.rewards[{i}]'s "
                             "whole call; raise rollout.reward_timeout_s or lower the pool's timeout_s")
