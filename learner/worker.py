"""`LearnerWorker`: one DeepSpeed (ZeRO) rank inside a Ray actor.

Each rank receives the whole batch (an ObjectRef resolved by Ray straight from the buffer actor),
computes group advantages on it (cheap, identical on every rank) and trains on its own share: whole
groups, balanced by tokens (`learner.batching`), with gradient accumulation over micro-batches of
``micro_batch_size`` samples or ``max_tokens_per_microbatch`` tokens. The loss is a token mean over the
global batch, so the update does not depend on how samples fall into ranks and micro-batches.

Weight export (`learner.weight_export`) gathers full parameters (ZeRO-3: every rank must enter the gather)
and rank 0 packs them into a few safetensors buckets for the rollout workers; the model's config is checked
once, at setup (`learner.model_support.scoring`), and every forward applies what that check decided.

Several optimizer steps per batch (``learner.ppo_minibatches``) make pi_prox differ from the current
policy after the first one; it is then recomputed by a forward pass before training or approximated
log-linearly by version (`learner.off_policy`).

With ``learner.lora`` the model is a PEFT LoRA model: the base weights are frozen (loaded in the compute
dtype, never in the optimizer, so they get no fp32 master copy), the optimizer holds the adapters
only, a weight export carries only the adapter tensors (PEFT names), checkpoints hold only the
trainable parameters, the KL reference is the same model with its adapters disabled, and
`save_pretrained` writes the adapters merged into an HF model plus the adapter in PEFT format.

Each micro-batch is one model forward: with ``learner.shared_prefix`` samples that share a prompt share
one encoding of it (`learner.layout.shared_prefix_layout`), and the LM head runs only at response
positions, in chunks (`learner.step.token_logprobs`); the policy's entropy on trained tokens is logged
as ``learner/entropy``.

Left out on purpose: several epochs over a batch.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import time
from typing import TYPE_CHECKING

from base.weight_group import group_store, host_store
from learner import model_support
from learner.checkpointing import LearnerCheckpoints
from learner.snapshots import LearnerSnapshots
from learner.weight_push import LearnerWeightPush
from learner.metrics import Metrics, Reduce, token_quantiles

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from base.model_source import ModelSource
    from learner.config import LearnerConfig


class LearnerWorker(LearnerCheckpoints, LearnerSnapshots, LearnerWeightPush):
    """One DeepSpeed rank.

    Args:
        cfg: `LearnerConfig`.
        model: the model (`base.model_source.ModelSource`, resolved to a dir on this rank's node), or a
            local HF model dir. A resumed run reloads its weights from the checkpoint, not from here.
        rank, world_size: position in the learner group.
        samples_per_step: nominal batch size in samples; sets DeepSpeed's gradient accumulation (the loss
            scale the normaliser undoes). Batches of other sizes train too (`learner.batching`).
        max_tokens: rollout max response tokens (Dr. GRPO's constant loss normaliser).
        temperature: rollout sampling temperature; logits are divided by it so learner logprobs
            are of the same distribution vLLM sampled from.
        seed: torch seed.
    """

    def __init__(self, cfg: LearnerConfig, model: ModelSource | str, rank: int, world_size: int, samples_per_step: int,
                 max_tokens: int, temperature: float, seed: int) -> None:
        import torch

        threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
        torch.set_num_threads(threads)
        torch.manual_seed(seed + rank)
        from base.model_source import local_model_dir

        self.cfg, self.model_path, self.rank, self.world_size = cfg, local_model_dir(model), rank, world_size
        self.temperature, self.max_tokens = temperature, max_tokens
        # gradient accumulation steps per optimizer step (one optimizer step per PPO minibatch)
        self.gas = samples_per_step // (world_size * cfg.ppo_minibatches * cfg.micro_batch_size)
        self.samples_per_step = samples_per_step
        self.engine = None
        self.scoring: model_support.Scoring | None = None  # set by setup(): the model checked once, at start

    def master_address(self) -> tuple[str, int]:
        """This node's address and the port of a TCP store this rank now hosts for a group it is about to join
        (the DeepSpeed rendezvous, a weight group; called on rank 0). The store holds its port from the moment
        the kernel picks it (`base.weight_group.host_store`), so no other process can take it before the group
        starts. The next `setup` or `join_weight_group` given this port uses the store; a later call replaces
        one that was never used."""
        import ray

        addr = ray.util.get_node_ip_address()
        self._hosted_store = None  # an unused earlier one releases its port
        self._hosted_store = host_store(addr, self.cfg.step_timeout_s)
        return addr, self._hosted_store.port

    def _group_store(self, addr: str, port: int, timeout_s: float):
        """The TCP store of the group at ``addr:port``: the one `master_address` hosts on this rank (used once),
        else a server (rank 0, a port the caller chose) or a client of it (`base.weight_group.group_store`)."""
        hosted, self._hosted_store = getattr(self, "_hosted_store", None), None
        return group_store(addr, port, self.rank == 0, timeout_s, hosted)

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group (its store: rank 0's from `master_address`) and build the DeepSpeed engine;
        returns the trainable parameter count."""
        import deepspeed
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        # refuse, before anything starts, a model feature the learner's scoring would get wrong (one line naming it);
        # every forward then applies what this one check decided (logit transform, sliding window)
        self.scoring = model_support.scoring(AutoConfig.from_pretrained(self.model_path), self.cfg.shared_prefix,
                                             self.cfg.attn_implementation)
        use_cuda = torch.cuda.is_available() and self.cfg.num_gpus > 0
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            # avoid a ~40 s JIT build of DeepSpeed's shared-memory comm op on first init
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # collectives time out instead of waiting forever on a rank that died
        timeout, backend = datetime.timedelta(seconds=self.cfg.step_timeout_s), "nccl" if use_cuda else "gloo"
        # torch's group over the store rank 0 already listens on (an env:// rendezvous would have rank 0 bind
        # MASTER_PORT only now, after that port was found free and released); DeepSpeed adopts an initialized group.
        # On CUDA the device is bound as DeepSpeed's own init binds it (LOCAL_RANK 0: Ray shows each rank one GPU)
        device = {"device_id": torch.device("cuda", 0)} if use_cuda and self.world_size > 1 else {}
        torch.distributed.init_process_group(backend, store=self._group_store(master_addr, master_port,
                                                                              self.cfg.step_timeout_s),
                                             rank=self.rank, world_size=self.world_size, timeout=timeout, **device)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        c = self.cfg
        from learner.ds_config import deepspeed_config

        ds_config = deepspeed_config(c, self.gas, self.samples_per_step)
        zero3_init = None
        if c.zero_stage == 3:  # load straight into partitions (deepspeed.zero.Init): no rank holds the full model
            from transformers.integrations import HfDeepSpeedConfig

            zero3_init = HfDeepSpeedConfig(ds_config)  # transformers holds a weak reference while it is alive
        # Loaded in the compute dtype: with bf16 DeepSpeed casts the module to bf16 before it builds the optimizer,
        # so an fp32 load only doubled each rank's peak host memory; ZeRO makes the fp32 masters of its partition
        # (LoRA: of the adapters only; the frozen base stays in the compute dtype)
        base_dtype = torch.bfloat16 if c.dtype == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=base_dtype,
                                                     attn_implementation=c.attn_implementation)
        model.config.use_cache = False
        if c.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if c.lora is not None:
            from learner.lora import with_lora

            model = with_lora(model, c.lora)
        trainable = [p for p in model.parameters() if p.requires_grad]
        n_trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainable)
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
        del zero3_init  # later loads (the KL reference) are plain, unpartitioned models
        self.ref_model = None
        if c.kl_coef > 0 and c.lora is None:  # with LoRA the reference is the model with adapters disabled
            self.ref_model = AutoModelForCausalLM.from_pretrained(
                self.model_path, dtype=torch.float32 if c.dtype == "fp32" else torch.bfloat16,
                attn_implementation=c.attn_implementation).to(self.engine.device).eval()
            self.ref_model.requires_grad_(False)
        return n_trainable

    # ---- training --------------------------------------------------------------------------
    def _forward(self, model, samples: list, with_entropy: bool = False):
        """``(logprobs [B, R_max], loss_mask [B, R_max])`` of ``samples`` under ``model`` at the rollout temperature
        (one forward; prompts shared with ``learner.shared_prefix``), ``with_entropy`` also the ``[B, R_max]``
        entropy."""
        from learner.step import response_logprobs

        return response_logprobs(model, samples, self.engine.device, self.temperature, self.cfg.shared_prefix,
                                 self.cfg.logit_chunk_tokens, with_entropy, self.cfg.max_tokens_per_microbatch,
                                 by_cost=self.cfg.shared_prefix_by_cost, scoring=self.scoring)

    def train_step(self, batch: list, version: int) -> Metrics:
        """``learner.ppo_minibatches`` optimizer steps on ``batch`` (sample groups; every rank gets all).

        ``version`` is the learner's policy version before the step (the proximal policy). Group
        advantages are computed on the whole batch (groups may differ in size; samples whose reward
        failed get 0 and stay out of the baselines); each sample's advantage is scaled by
        ``staleness_decay ** staleness``. Each rank trains on whole groups, balanced by tokens, split
        into minibatches and micro-batches by `plan_microbatches`; each
        minibatch loss is normalised over all ranks (``learner.loss_agg``), so the batch size may vary
        from step to step. pi_prox is the current policy exactly in the first minibatch, then
        recomputed before training or approximated log-linearly (``learner.prox_logprobs``). With
        ``learner.skip_zero_advantage`` and no KL term, samples whose advantage is 0 are not run
        (`learner.batching.restrict_plan`): their gradient is exactly 0, and their tokens still count in
        the normaliser, so the update is the same up to floating-point summation order.

        Self-imitation replays (one-sample groups marked ``replayed``, after the fresh groups:
        `buffer.ReplayBuffer.take_batch`) take no part in the advantages, the policy loss or the batch metrics; each
        is trained with the self-imitation term only (`learner.self_imitation`), its tokens in the same normaliser.

        Returns this rank's metrics, each with its cross-rank reduction (`learner.metrics.Metrics`):
        token-weighted means over this rank's micro-batches that ran; ``learner/tokens``: loss tokens of
        this rank's share, skipped samples included; ``learner/skipped_sample_frac``: samples of the batch
        not run.

        Raises:
            ValueError: too few samples for ``ppo_minibatches``, a sample longer than
                ``max_tokens_per_microbatch`` (`learner.batching.plan_microbatches`), or a replay before a fresh
                group (`learner.self_imitation.split_replays`).
        """
        from learner.batching import BatchShape, plan_microbatches, prox_schedule, restrict_plan
        from learner.self_imitation import split_replays
        from learner.step import TokenWeightedMeans, batch_metrics, recompute_prox, step_advantages

        t0 = time.perf_counter()
        samples = [s for g in batch for s in g]
        c, W, M = self.cfg, self.world_size, self.cfg.ppo_minibatches
        shape = BatchShape.of(batch)
        plan = plan_microbatches(shape, W, M, c.micro_batch_size, c.max_tokens_per_microbatch, c.shared_prefix)
        fresh, sil = split_replays(batch, c.self_imitation.max_advantage)  # the replays follow the fresh groups
        n_fresh = sum(len(g) for g in fresh)
        prep = step_advantages(fresh, version, c.advantage, c.staleness_decay)
        advantages = prep.advantages + [0.0] * (len(samples) - n_fresh)
        normalizers = self._normalizers(plan, samples)  # over all samples, before any is skipped
        my_tokens = sum(sum(samples[i].loss_mask) for mb in plan[self.rank] for micro in mb for i in micro)
        keep = [True] * len(samples)
        if c.skip_zero_advantage and c.kl_coef == 0:  # a zero advantage is a zero gradient under every loss
            keep = [a != 0.0 or b > 0.0 for a, b in zip(advantages, sil)]
            plan = restrict_plan(plan, shape, keep, c.micro_batch_size, c.max_tokens_per_microbatch, c.shared_prefix)
        skipped_before = self.engine.skipped_steps
        prox_exact = None
        if M > 1 and c.prox_logprobs == "recompute":
            prox_exact = recompute_prox(lambda mb: self._forward(self.engine, mb)[0], samples,
                                        prox_schedule(plan, self.rank))
        means, loss_total, sil_totals = TokenWeightedMeans(), 0.0, {"learner/sil_loss": 0.0, "learner/sil_tokens": 0.0}
        for k in range(M):
            normalizer, passes = normalizers[k], plan[self.rank][k]
            for j, idx in enumerate(passes):
                # the last pass of a minibatch ends it with an optimizer step, however many passes it had
                self.engine.set_gradient_accumulation_boundary(j == len(passes) - 1)
                if not idx:  # this rank has no samples left here: a zero-weighted pass keeps ranks in step
                    self._train_pass([samples[0]], [0.0], None, k, version, normalizer, padding=True)
                    continue
                exact = [prox_exact[i] for i in idx] if prox_exact is not None else None
                loss, met = self._train_pass([samples[i] for i in idx], [advantages[i] for i in idx], exact,
                                             k, version, normalizer, sil=[sil[i] for i in idx])
                if "learner/sil_loss" in met:  # the term's share of the batch loss, as learner/loss below
                    sil_totals["learner/sil_loss"] += met.pop("learner/sil_loss") / (self.gas * W * M)
                    sil_totals["learner/sil_tokens"] += met.pop("learner/sil_tokens")
                    met.pop("learner/sil_advantage_mean")  # a micro-batch's; not weighted by the fresh tokens
                means.add(met, met.pop("learner/tokens"))
                loss_total += loss / (self.gas * W * M)  # this rank's share of the mean over minibatches
        out = self._step_metrics(means, loss_total, skipped_before, t0,
                                 batch_metrics(samples[:n_fresh], prep, self.rank == 0))
        if n_fresh < len(samples):  # this rank's share: the sums over ranks are the batch's
            out.put(Reduce.SUM, sil_totals)
        out.put(Reduce.SUM, {"learner/tokens": my_tokens})  # the loss's tokens on this rank, skipped samples included
        out.put(Reduce.FIRST, {"learner/skipped_sample_frac": 1.0 - sum(keep) / len(samples)})  # same on every rank
        return out

    def _normalizers(self, plan: list, samples: list) -> list[float]:
        """Loss denominator of each PPO minibatch of ``plan`` over all ranks (``learner.loss_agg``), divided
        by GAS and world size: DeepSpeed divides by the one and averages over the other, so undoing both
        makes each minibatch one mean."""
        from learner.off_policy import loss_normalizer

        out = []
        for k in range(self.cfg.ppo_minibatches):
            mb_all = [i for rank_plan in plan for micro in rank_plan[k] for i in micro]
            n_tok = sum(sum(samples[i].loss_mask) for i in mb_all)
            out.append(loss_normalizer(self.cfg.loss_agg, n_tok, len(mb_all), self.max_tokens) /
                       (self.gas * self.world_size))
        return out

    def _train_pass(self, mb: list, adv: list[float], exact: list | None, k: int, version: int, normalizer: float,
                    padding: bool = False, sil: list[float] | None = None) -> tuple[float, dict[str, float]]:
        """Forward, policy loss (+ KL to the reference, + the self-imitation term), backward and ``engine.step()``
        of one micro-batch ``mb`` with ``[B]`` (weighted) advantages ``adv``; the optimizer steps only at the
        boundary the caller set. ``exact``: recomputed pi_prox per sample (``[R_i]``) or None; ``k``:
        PPO minibatch index; ``normalizer``: the minibatch loss denominator over GAS and world size;
        ``padding``: a zero-weighted pass (loss times 0); ``sil``: ``[B]`` self-imitation advantages (0 for fresh
        samples). The policy loss sees the fresh samples' tokens only, the self-imitation term
        (`learner.self_imitation.self_imitation_loss`) the replayed ones'. Returns the loss value and the loss
        metrics (``learner/tokens``: trained tokens of fresh samples in ``mb``; ``learner/sil_*`` when ``mb`` holds
        replays)."""
        import torch

        from learner.losses import PolicyLossInput, k3_kl_penalty, policy_loss
        from learner.self_imitation import self_imitation_loss
        from learner.step import later_minibatch_prox, padded_field

        c = self.cfg
        logprobs, mask, entropy = self._forward(self.engine, mb, with_entropy=True)
        beh = padded_field(mb, "behaviour_logprobs", logprobs, 0.0)
        extra: dict[str, float] = {}
        if k == 0:  # no optimizer step yet in this batch: pi_theta is pi_prox exactly
            prox = logprobs.detach()
        else:  # metrics here cover minibatches 2..M
            versions = padded_field(mb, "policy_versions", logprobs, float(version))
            prox, extra = later_minibatch_prox(logprobs.detach(), beh, versions, mask, version,
                                               k / c.ppo_minibatches, exact)
        replayed = torch.tensor([float(s.replayed) for s in mb], device=logprobs.device, dtype=mask.dtype)[:, None]
        inp = PolicyLossInput(logprobs, prox, beh, torch.tensor(adv, device=logprobs.device), mask * (1 - replayed),
                              normalizer, entropy=entropy)
        loss, met = policy_loss(inp, c.loss)
        if bool(replayed.any()):  # no importance ratio: see learner.self_imitation
            term, sil_met = self_imitation_loss(logprobs, mask * replayed, torch.tensor(sil, device=logprobs.device),
                                                c.self_imitation.coef, normalizer)
            loss = loss + term
            met.update(sil_met)
        met.update(extra)
        met["learner/entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1.0))
        met.update(token_quantiles(entropy, mask, "learner/entropy"))  # p10/p50/p90 on trained tokens
        if c.kl_coef > 0:
            with torch.no_grad():
                ref = self._reference_logprobs(mb)
            penalty, met["learner/kl_ref"] = k3_kl_penalty(logprobs, ref, mask, normalizer)
            loss = loss + c.kl_coef * penalty
        if padding:
            loss = loss * 0.0
        self.engine.backward(loss)
        self.engine.step()  # steps the optimizer at the boundary set by the caller
        return float(loss.detach()), met

    def _reference_logprobs(self, mb: list):
        """``[B, R_max]`` logprobs of ``mb`` under the KL reference: the separate reference model, or with
        LoRA the policy with its adapters disabled (the base model)."""
        if self.ref_model is not None:
            return self._forward(self.ref_model, mb)[0]
        with self.engine.module.disable_adapter():
            return self._forward(self.engine.module, mb)[0]

    def _step_metrics(self, means, loss_total: float, skipped_before: int, t0: float, batch_metrics: Metrics
                      ) -> Metrics:
        """The step's metrics, each with how it combines across ranks: token-weighted loss metrics (``means``,
        a `TokenWeightedMeans`), the optimizer's (grad norm, LR, steps skipped since ``skipped_before``) and
        ``batch_metrics``.

        Raises:
            RuntimeError: the gradient norm is non-finite and DeepSpeed applied the step anyway.
        """
        c = self.cfg
        # token means over this rank's micro-batches: token means over every rank's tokens when merged
        out = Metrics().put(Reduce.TOKEN_MEAN, means.means())
        out.put(Reduce.SUM, {"learner/loss": loss_total})  # this rank's share of the batch loss
        # DeepSpeed (bf16, ZeRO 1/2) skips an optimizer step whose gradients are non-finite and counts it
        skipped = self.engine.skipped_steps - skipped_before
        grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        if not math.isfinite(grad_norm) and skipped == 0:
            raise RuntimeError(
                f"learner rank {self.rank}: non-finite gradient norm ({grad_norm}) and the optimizer step was "
                f"applied (learner.dtype={c.dtype}, zero_stage={c.zero_stage} do not check gradients); the "
                "weights are no longer valid: resume from the last checkpoint")
        # the optimizer's state after a collective step is the same on every rank
        out.put(Reduce.FIRST, {"learner/skipped_steps": skipped,
                               "learner/grad_norm": grad_norm if math.isfinite(grad_norm) else -1.0,
                               "learner/lr": self.engine.get_lr()[0]})
        out.put(Reduce.SUM, {"learner/tokens": means.total_tokens})
        out.put(Reduce.MAX, {"learner/seconds": time.perf_counter() - t0})  # the slowest rank
        out.put(Reduce.FIRST, {"learner/optimizer_steps": c.ppo_minibatches})
        return out.extend(batch_metrics)

    def peak_memory_bytes(self) -> int:
        """Peak memory of this rank so far, in bytes: allocated GPU memory on CUDA, else the process's peak
        resident set (``ru_maxrss``; model load included)."""
        import resource

        import torch

        if self.engine is not None and self.engine.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.engine.device))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def probe(self, groups: list, version: int, num_samples: int) -> dict[str, float]:
        """The sentinel's forward: score up to ``num_samples`` samples of ``groups`` (`learner.sentinel.probe_samples`)
        at the rollout temperature, with no gradient and the training forward's layout, and compare them with
        their behaviour logprobs on the trained tokens sampled at policy ``version``, which must be this rank's
        own version (`learner.sentinel.logprob_gap`). Every rank runs the forward under ZeRO-3 (its gathers),
        rank 0 alone otherwise.

        Returns rank 0's gap (``tokens``, ``mean_abs_logprob_diff``, ``max_abs_logprob_diff``, ``mismatch_kl``;
        ``tokens`` alone, 0, when no sample qualifies) plus ``seconds``; other ranks return ``{}``.
        """
        import torch

        from learner.sentinel import logprob_gap, probe_samples
        from learner.step import padded_field

        if self.rank != 0 and self.cfg.zero_stage != 3:
            return {}
        t0 = time.perf_counter()
        samples = probe_samples(groups, version, num_samples)
        if not samples:  # every response failed, or none has a trained token of this version
            return {"tokens": 0.0, "seconds": time.perf_counter() - t0}
        with torch.no_grad():
            lp, mask = self._forward(self.engine, samples)
        behaviour = padded_field(samples, "behaviour_logprobs", lp, 0.0)
        versions = padded_field(samples, "policy_versions", lp, -1.0)
        gap = logprob_gap(lp.float(), behaviour.float(), mask * (versions == version))
        return {**gap, "seconds": time.perf_counter() - t0} if self.rank == 0 else {}

    def sequence_logprobs(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Learner logprobs of ``token_ids[prompt_len:]`` at temperature 1 (for push checks)."""
        import torch

        from buffer import Sample
        from learner.step import response_logprobs

        s = Sample("check", "check", token_ids[:prompt_len], token_ids[prompt_len:],
                   [0.0] * (len(token_ids) - prompt_len), [0] * (len(token_ids) - prompt_len))
        with torch.no_grad():
            lp, _ = response_logprobs(self.engine, [s], self.engine.device, 1.0, self.cfg.shared_prefix,
                                      self.cfg.logit_chunk_tokens, scoring=self.scoring)
        return lp[0, : len(token_ids) - prompt_len].tolist()
