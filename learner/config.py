"""Config of the learner (`LearnerConfig`): DeepSpeed ranks, optimiser, advantage, policy loss.

Composed by `orchestrator.config.RunConfig`; each learner rank receives this section. The policy loss
(``learner.loss``) and the advantage estimator (``learner.advantage``) are tagged unions of the config
classes their registries list (`learner.losses.POLICY_LOSSES`, `learner.advantages.ADVANTAGE_ESTIMATORS`):
``loss = {type = "gspo", clip_high = 5e-4}``, or just ``loss = "gspo"`` for that loss with its defaults;
a dotted override reaches a knob (``learner.loss.clip_high=5e-4``).

Left out on purpose: user losses by import path (a loss is a registry entry in `learner.losses`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from base.adapter import LoraSpec
from base.config import StrictConfig, tagged_union
from learner.advantages import ADVANTAGE_ESTIMATORS, GrpoAdvantageConfig
from learner.losses import POLICY_LOSSES, PpoTisLossConfig
from learner.self_imitation import SelfImitationLossConfig


LossConfig = tagged_union("learner.loss", [e.config for e in POLICY_LOSSES.values()], PpoTisLossConfig)
"""``learner.loss``: one policy loss's config, chosen by its ``type`` (`learner.losses.POLICY_LOSSES`)."""

AdvantageConfig = tagged_union("learner.advantage", [e.config for e in ADVANTAGE_ESTIMATORS.values()],
                               GrpoAdvantageConfig)
"""``learner.advantage``: one advantage estimator's config, chosen by its ``type``
(`learner.advantages.ADVANTAGE_ESTIMATORS`)."""


class LearnerConfig(StrictConfig):
    num_learners: int = Field(1, ge=1, le=4096, description="DeepSpeed ranks (Ray actors)")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage")
    dtype: Literal["bf16", "fp32"] = Field("bf16", description="learner compute dtype (fp32 master)")
    lr: float = Field(1e-5, gt=0.0, le=1.0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear LR warmup steps")
    grad_clip: float = Field(1.0, gt=0.0, description="max global grad norm")
    micro_batch_size: int = Field(8, ge=1, le=4096, description="samples per forward/backward (when "
                                  "max_tokens_per_microbatch is 0)")
    max_tokens_per_microbatch: int = Field(
        0, ge=0, description="token budget of one forward/backward: as many samples as fit in this many forward "
        "tokens (shared prefix: each prompt once; padded: rows x longest); 0: micro_batch_size samples")
    advantage: AdvantageConfig = Field(
        default_factory=GrpoAdvantageConfig, description="advantage estimator and its knobs, chosen by type "
        "(learner.advantages.ADVANTAGE_ESTIMATORS); a bare name gives its defaults")
    loss: LossConfig = Field(
        default_factory=PpoTisLossConfig, description="policy loss / off-policy correction and its knobs, chosen by "
        "type (learner.losses.POLICY_LOSSES; 'ppo' has no behaviour correction); a bare name gives its defaults")
    kl_coef: float = Field(0.0, ge=0.0, description="KL-to-reference weight (0: no reference model)")
    self_imitation: SelfImitationLossConfig = Field(
        default_factory=SelfImitationLossConfig, description="the self-imitation term on replayed samples (Oh et al. "
        "2018: -(R - V)+ log pi, no importance ratio; learner.self_imitation), when buffer.self_imitation.fraction "
        "> 0")
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
    snapshot_every: int = Field(
        1, ge=0, description="learner failover: every this many steps each rank copies its training state (ZeRO "
        "partition, optimizer, LR scheduler, RNG) into memory on another node; when a rank dies the ranks are "
        "replaced and restored from the newest snapshot, losing at most one step. 0: no snapshots (a dead rank "
        "falls back to the last checkpoint)")
    max_failovers: int = Field(
        3, ge=0, description="learner failovers (from a snapshot, or from the last checkpoint when the snapshot "
        "was lost too) one run may make; a dead rank past it stops the run")
    zero3_param_persistence_threshold: int = Field(
        100_000, ge=0, description="ZeRO-3: parameters with fewer elements stay whole on every rank instead of "
        "being gathered for each forward (DeepSpeed's stage3_param_persistence_threshold)")

    gradient_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in backward (less activation memory, ~1/3 "
        "more compute)")
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: optimizer state in CPU memory, stepped by DeepSpeed's CPU Adam (GPU "
        "learners only)")
    offload_params: bool = Field(
        False, description="ZeRO-3 parameter offload to CPU memory between uses (GPU learners, zero_stage 3 only)")

    shared_prefix: bool = Field(
        True, description="samples of a micro-batch with the same prompt share one encoding of it (one packed row "
        "per prompt with a block attention mask; same logprobs and gradients as one padded row per sample)")
    shared_prefix_by_cost: bool = Field(
        True, description="with shared_prefix, a micro-batch whose shared-prefix row is estimated dearer than one "
        "padded row per sample (long responses after a short prompt: the block mask's attention grows with the "
        "square of the row) runs as padded rows instead (learner.layout.shared_prefix_pays); false: always "
        "shared prefix")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = Field(
        "sdpa", description="transformers attention implementation of the learner's model; shared_prefix needs "
        "sdpa or eager (flash-attention takes no custom mask)")
    skip_zero_advantage: bool = Field(
        True, description="leave samples whose advantage is 0 (e.g. GRPO groups with all-equal rewards) out of the "
        "forward and backward passes: with kl_coef = 0 their gradient is exactly 0 under every loss, so the update "
        "is the same (up to floating-point summation order); their tokens still count in the loss normaliser. "
        "Entropy and off_policy/* metrics then cover the trained samples only. No effect with kl_coef > 0")
    logit_chunk_tokens: int = Field(
        1024, ge=1, le=1 << 20, description="positions per chunk of the LM head (only response positions are "
        "scored; peak logits memory is chunk x vocab)")

    lora: LoraSpec | None = Field(
        None, description="train LoRA adapters (base.adapter.LoraSpec: rank, alpha, dropout, target_modules) on "
        "frozen base weights and push only the adapters; None: full fine-tuning")

    @model_validator(mode="before")
    @classmethod
    def _knobs_moved_into_their_variant(cls, data: Any) -> Any:
        """A loss or estimator knob at the top level (``learner.clip_low``, where it used to be): say where it
        went, not just 'extra field'."""
        if not isinstance(data, dict):
            return data
        for key in data:
            if key in cls.model_fields or key == "type":
                continue
            for field, registry in (("loss", POLICY_LOSSES), ("advantage", ADVANTAGE_ESTIMATORS)):
                takers = [name for name, e in registry.items() if key in e.config.model_fields]
                if takers:
                    chosen = data.get(field)
                    chosen = chosen.get("type") if isinstance(chosen, dict) else getattr(chosen, "type", chosen)
                    name = chosen if chosen in takers else takers[0]
                    raise ValueError(f"learner.{key} is a knob of learner.{field} now: set learner.{field} = "
                                     f'{{type = "{name}", {key} = ...}} '
                                     f"(override: learner.{field}.{key}=...); the {field} types with it: "
                                     f"{', '.join(takers)}")
        return data

    @model_validator(mode="after")
    def _shared_prefix_needs_a_block_mask(self) -> LearnerConfig:
        """Flash-attention kernels take a causal mask and sequence boundaries, not the block mask that lets a
        response see its prompt but not its siblings."""
        if self.shared_prefix and self.attn_implementation.startswith("flash_attention"):
            raise ValueError(f"learner.shared_prefix = true needs a custom 4D attention mask, which "
                             f"learner.attn_implementation = {self.attn_implementation!r} cannot take: use 'sdpa' or "
                             "'eager', or set learner.shared_prefix = false")
        return self

    @model_validator(mode="after")
    def _offload_needs_a_gpu(self) -> LearnerConfig:
        """Offload moves state from GPU to CPU memory; on a CPU learner there is nothing to move."""
        for name in ("offload_optimizer", "offload_params"):
            if getattr(self, name) and self.num_gpus == 0:
                raise ValueError(f"learner.{name} = true moves state from GPU to CPU memory, but learner.num_gpus "
                                 "= 0 keeps everything in CPU memory already; leave it false on CPU")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"learner.offload_params needs learner.zero_stage = 3 (parameters are partitioned "
                             f"only there), got {self.zero_stage}")
        return self
