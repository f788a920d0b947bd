"""`LearnerWorker`: one DeepSpeed (ZeRO) rank inside a Ray actor.

Each rank receives the whole batch (an ObjectRef resolved by Ray straight from the buffer actor),
computes group advantages on it (cheap, identical on every rank) and trains on its own shard
``samples[rank::world_size]`` with gradient accumulation over micro-batches. The loss is a token
mean over the global batch, so the update does not depend on how samples fall into ranks and
micro-batches.

Weight export gathers full parameters (ZeRO-3: every rank must enter the gather) and rank 0 packs
them into a few safetensors buckets for the rollout workers.

Several optimizer steps per batch (``learner.ppo_minibatches``) make pi_prox differ from the current
policy after the first one; it is then recomputed by a forward pass before training or approximated
log-linearly by version (`learner.off_policy`).

Left out on purpose: several epochs over a batch, sequence packing.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import time

logger = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerWorker:
    """One DeepSpeed rank.

    Args:
        cfg: `LearnerConfig`.
        model_path: local HF model dir.
        rank, world_size: position in the learner group.
        samples_per_step: nominal batch size in samples; sets DeepSpeed's gradient accumulation (the loss
            scale the normaliser undoes). Batches of other sizes train too (`learner.batching`).
        max_tokens: rollout max response tokens (Dr. GRPO's constant loss normaliser).
        temperature: rollout sampling temperature; logits are divided by it so learner logprobs
            are of the same distribution vLLM sampled from.
        seed: torch seed.
    """

    def __init__(self, cfg, model_path: str, rank: int, world_size: int, samples_per_step: int,
                 max_tokens: int, temperature: float, seed: int) -> None:
        import torch

        threads = cfg.torch_threads or max(1, int(cfg.num_cpus))
        torch.set_num_threads(threads)
        torch.manual_seed(seed + rank)
        self.cfg, self.model_path, self.rank, self.world_size = cfg, model_path, rank, world_size
        self.temperature, self.max_tokens = temperature, max_tokens
        # gradient accumulation steps per optimizer step (one optimizer step per PPO minibatch)
        self.gas = samples_per_step // (world_size * cfg.ppo_minibatches * cfg.micro_batch_size)
        self.samples_per_step = samples_per_step
        self.engine = None

    def master_address(self) -> tuple[str, int]:
        """Address and a free port for the rendezvous (called on rank 0)."""
        import ray

        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int) -> int:
        """Join the process group and build the DeepSpeed engine; returns the parameter count."""
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM

        use_cuda = torch.cuda.is_available() and self.cfg.num_gpus > 0
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            # Avoid a ~40 s JIT build of the shared-memory comm op on first init (PLATFORM.md).
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # collectives time out instead of waiting forever on a rank that died
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=self.cfg.step_timeout_s))
        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32)
        model.config.use_cache = False
        c = self.cfg
        ds_config = {
            "train_micro_batch_size_per_gpu": c.micro_batch_size,
            "gradient_accumulation_steps": self.gas,
            "train_batch_size": self.samples_per_step // c.ppo_minibatches,
            "gradient_clipping": c.grad_clip,
            "zero_optimization": {"stage": c.zero_stage},
            "bf16": {"enabled": c.dtype == "bf16"},
            "optimizer": {"type": "AdamW", "params": {
                "lr": c.lr, "weight_decay": c.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8,
                "torch_adam": True}},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if c.warmup_steps:
            ds_config["scheduler"] = {"type": "WarmupLR", "params": {
                "warmup_min_lr": 0.0, "warmup_max_lr": c.lr, "warmup_num_steps": c.warmup_steps,
                "warmup_type": "linear"}}
        self.engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        self.ref_model = None
        if c.kl_coef > 0:
            self.ref_model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
            self.ref_model.requires_grad_(False)
        return sum(p.numel() for p in model.parameters())

    # ---- forward ---------------------------------------------------------------------------
    def _response_logprobs(self, model, samples, device):
        """Per-token logprobs of each sample's response tokens: ``[B, R_max]`` plus mask ``[B, R_max]``."""
        import torch

        lens = [s.num_tokens for s in samples]
        T, R = max(lens), max(max(len(s.response_ids) for s in samples), 1)
        ids = torch.zeros(len(samples), T, dtype=torch.long)
        attn = torch.zeros(len(samples), T, dtype=torch.long)
        for i, s in enumerate(samples):
            seq = s.prompt_ids + s.response_ids
            ids[i, : len(seq)] = torch.tensor(seq)
            attn[i, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits.float()
        logits = logits / self.temperature
        out = torch.zeros(len(samples), R, device=device)
        mask = torch.zeros(len(samples), R, device=device)
        for i, s in enumerate(samples):
            P, r = len(s.prompt_ids), len(s.response_ids)
            if r == 0:
                continue
            lp = torch.log_softmax(logits[i, P - 1 : P - 1 + r], dim=-1)
            tgt = torch.tensor(s.response_ids, device=device)
            out[i, :r] = lp.gather(1, tgt[:, None]).squeeze(1)
            mask[i, :r] = torch.tensor(s.loss_mask, dtype=torch.float32, device=device)
        return out, mask

    # ---- training --------------------------------------------------------------------------
    def _padded(self, mb, attr: str, like, pad: float):
        """``[B, R_max]`` tensor of a per-token Sample field, right-padded with ``pad``."""
        import torch

        out = torch.full_like(like, pad)
        for i, s in enumerate(mb):
            vals = getattr(s, attr)
            out[i, : len(vals)] = torch.tensor(vals, dtype=out.dtype)
        return out

    def _recompute_prox(self, samples: list) -> list:
        """log pi_prox of each sample (``[R]`` tensors): a no-grad forward pass before the first step."""
        import torch

        out = []
        with torch.no_grad():
            for start in range(0, len(samples), self.cfg.micro_batch_size):
                mb = samples[start : start + self.cfg.micro_batch_size]
                lp, _ = self._response_logprobs(self.engine, mb, self.engine.device)
                out.extend(lp[i, : len(s.response_ids)].clone() for i, s in enumerate(mb))
        return out

    def train_step(self, batch: list, version: int) -> dict[str, float]:
        """``learner.ppo_minibatches`` optimizer steps on ``batch`` (sample groups; every rank gets all).

        ``version`` is the learner's policy version before the step (the proximal policy). Group
        advantages are computed on the whole batch (groups may differ in size); each sample's
        advantage is scaled by ``staleness_decay ** staleness``. Rank ``r`` trains on
        ``samples[r::world]``, split into minibatches and micro-batches by `plan_microbatches`; each
        minibatch loss is normalised over all ranks (``learner.loss_agg``), so the batch size may vary
        from step to step. pi_prox is the current policy exactly in the first minibatch, then
        recomputed before training or approximated log-linearly (``learner.prox_logprobs``).

        Returns metrics (token-weighted means over this rank's micro-batches).

        Raises:
            ValueError: fewer samples than ``world_size * ppo_minibatches``.
        """
        import torch

        from learner.advantages import batch_advantages
        from learner.batching import plan_microbatches
        from learner.losses import POLICY_LOSSES, PolicyLossInput, k3_kl_penalty
        from learner.off_policy import loglinear_prox_logprobs, loss_normalizer, staleness_weights

        t0 = time.perf_counter()
        samples = [s for g in batch for s in g]
        c, W, M = self.cfg, self.world_size, self.cfg.ppo_minibatches
        plan = plan_microbatches(len(samples), W, M, c.micro_batch_size)
        baselines = None
        if c.advantage == "spo":
            if any(s.baseline is None for s in samples):
                raise ValueError("learner.advantage = 'spo' needs per-prompt baselines: set buffer.value_tracker = true")
            baselines = [[s.baseline for s in g] for g in batch]
        adv, adv_metrics = batch_advantages(c.advantage, [[s.reward for s in g] for g in batch], baselines)
        effective = sum(abs(a) > 1e-6 for a in adv)
        weights = staleness_weights(torch.tensor([s.staleness(version) for s in samples]), c.staleness_decay)
        adv = (torch.tensor(adv) * weights).tolist()
        mine = [i for mb in plan[self.rank] for micro in mb for i in micro]
        skipped_before = self.engine.skipped_steps
        prox_exact = None
        if M > 1 and c.prox_logprobs == "recompute":
            prox_exact = dict(zip(mine, self._recompute_prox([samples[i] for i in mine])))
        device = self.engine.device
        totals: dict[str, float] = {}
        key_tokens: dict[str, float] = {}
        tok_total, loss_total = 0.0, 0.0
        for k in range(M):
            mb_all = [i for rank_plan in plan for micro in rank_plan[k] for i in micro]
            n_tok = sum(sum(samples[i].loss_mask) for i in mb_all)
            # DeepSpeed divides by GAS and averages over ranks: undo both so the minibatch is one mean
            normalizer = loss_normalizer(c.loss_agg, n_tok, len(mb_all), self.max_tokens) / (self.gas * W)
            passes = plan[self.rank][k]
            for j, idx in enumerate(passes):
                # the last pass of a minibatch ends it with an optimizer step, however many passes it had
                self.engine.set_gradient_accumulation_boundary(j == len(passes) - 1)
                padding = not idx  # this rank has no samples left here: a zero-weighted pass keeps ranks in step
                mb = [samples[mine[0]]] if padding else [samples[i] for i in idx]
                logprobs, mask = self._response_logprobs(self.engine, mb, device)
                beh = self._padded(mb, "behaviour_logprobs", logprobs, 0.0)
                extra: dict[str, float] = {}
                if k == 0:  # no optimizer step yet in this batch: pi_theta is pi_prox exactly
                    prox = logprobs.detach()
                else:  # metrics here cover minibatches 2..M
                    versions = self._padded(mb, "policy_versions", logprobs, float(version))
                    approx = loglinear_prox_logprobs(beh, logprobs.detach(), versions, version, version + k / M)
                    prox = approx
                    if prox_exact is not None and not padding:
                        prox = torch.zeros_like(logprobs)
                        for i, p in enumerate(idx):
                            prox[i, : len(prox_exact[p])] = prox_exact[p]
                        n = mask.sum().clamp(min=1.0)
                        extra["off_policy/prox_loglinear_abs_err"] = float(((approx - prox).abs() * mask).sum() / n)
                    # how far pi_theta has moved from pi_prox within this batch, nats per token
                    extra["learner/intra_batch_drift"] = float(((logprobs.detach() - prox).abs() * mask).sum()
                                                              / mask.sum().clamp(min=1.0))
                mb_adv = torch.tensor([0.0] if padding else [adv[i] for i in idx], device=device)
                inp = PolicyLossInput(logprobs, prox, beh, mb_adv, mask, normalizer)
                loss, met = POLICY_LOSSES[c.loss](inp, clip_low=c.clip_low, clip_high=c.clip_high, tis_cap=c.tis_cap,
                                                  band_low=c.band_low, band_high=c.band_high)
                met.update(extra)
                if self.ref_model is not None:
                    with torch.no_grad():
                        ref, _ = self._response_logprobs(self.ref_model, mb, device)
                    penalty, met["learner/kl_ref"] = k3_kl_penalty(logprobs, ref, mask, normalizer)
                    loss = loss + c.kl_coef * penalty
                if padding:
                    loss = loss * 0.0
                self.engine.backward(loss)
                self.engine.step()  # steps the optimizer at the boundary set above
                ntok = met.pop("learner/tokens")
                if padding:
                    continue
                tok_total += ntok
                for key, v in met.items():  # token-weighted over the micro-batches that report the key
                    totals[key] = totals.get(key, 0.0) + v * ntok
                    key_tokens[key] = key_tokens.get(key, 0.0) + ntok
                # this rank's share of the minibatch mean, averaged over minibatches
                loss_total += float(loss.detach()) / (self.gas * W * M)
        out = {k: v / max(key_tokens[k], 1.0) for k, v in totals.items()}
        out["learner/loss"] = loss_total
        # DeepSpeed (bf16, ZeRO 1/2) skips an optimizer step whose gradients are non-finite and counts it
        out["learner/skipped_steps"] = float(self.engine.skipped_steps - skipped_before)
        grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        if not math.isfinite(grad_norm) and out["learner/skipped_steps"] == 0:
            raise RuntimeError(
                f"learner rank {self.rank}: non-finite gradient norm ({grad_norm}) and the optimizer step was "
                f"applied (learner.dtype={c.dtype}, zero_stage={c.zero_stage} do not check gradients); the "
                "weights are no longer valid: resume from the last checkpoint")
        out["learner/grad_norm"] = grad_norm if math.isfinite(grad_norm) else -1.0
        out["learner/lr"] = float(self.engine.get_lr()[0])
        out["learner/tokens"] = tok_total
        out["learner/seconds"] = time.perf_counter() - t0
        out["learner/optimizer_steps"] = float(M)
        out["off_policy/sample_weight_mean"] = float(weights.mean())
        out.update(adv_metrics)
        out["learner/samples"] = float(len(samples))
        if self.rank == 0:
            out["curation/effective_samples"] = float(effective)  # samples with a non-zero advantage
            out["rollout/reward_mean"] = sum(s.reward for s in samples) / len(samples)
            out["rollout/correct_frac"] = sum(s.correct for s in samples) / len(samples)
            out["rollout/response_len_mean"] = sum(len(s.response_ids) for s in samples) / len(samples)
            out["rollout/truncated_frac"] = sum(s.status == "truncated" for s in samples) / len(samples)
        return out

    # ---- weights ---------------------------------------------------------------------------
    def _gathered_named_params(self):
        """Yield ``(hf_name, full tensor on CPU)``; under ZeRO-3 every rank must call this."""
        import deepspeed

        module = self.engine.module
        for name, p in module.named_parameters():
            if self.cfg.zero_stage == 3:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    yield name, p.detach().to("cpu", copy=True)
            else:
                yield name, p.detach().to("cpu")

    def join_weight_group(self, backend: str, addr: str, port: int, world_size: int, timeout_s: float,
                          name: str) -> None:
        """Rank 0 joins (as source, group rank 0) the weight-broadcast group ``name``; other ranks do nothing."""
        if self.rank == 0:
            from buffer.weight_transport import WeightGroup

            self.weight_group = None  # the previous generation's group goes first
            self.weight_group = WeightGroup(backend, addr, port, 0, world_size, timeout_s, name)

    def broadcast_weights(self, version: int, dtype: str, bucket_bytes: int) -> dict:
        """Export the weights (every rank: ZeRO-3 gathers) and broadcast them from rank 0 to the
        rollout workers of the weight group; returns export and broadcast metrics (rank 0)."""
        buckets, m = self.export_weights(dtype, bucket_bytes)
        if self.rank != 0:
            return {}
        t0 = time.perf_counter()
        self.weight_group.send(version, buckets)
        return {**m, "weights/broadcast_seconds": time.perf_counter() - t0}

    def export_weights(self, dtype: str, bucket_bytes: int) -> tuple[list[bytes] | None, dict]:
        """Full weights as safetensors buckets (rank 0; other ranks return None) and export metrics.

        Tied parameters appear once (``named_parameters`` de-duplicates), which is what vLLM's
        loader expects for tied embeddings.
        """
        import torch

        from buffer.weight_buckets import serialize_buckets  # the format the engine loads

        t0 = time.perf_counter()
        dt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
        named = ((n, t.to(dt)) for n, t in self._gathered_named_params())
        if self.rank != 0:
            for _ in named:  # take part in ZeRO-3 gathers
                pass
            return None, {}
        buckets = serialize_buckets(named, bucket_bytes)
        return buckets, {"weights/export_seconds": time.perf_counter() - t0,
                         "weights/bytes": float(sum(len(b) for b in buckets)),
                         "weights/buckets": float(len(buckets))}

    def sequence_logprobs(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Learner logprobs of ``token_ids[prompt_len:]`` at temperature 1 (for push checks)."""
        import torch

        from buffer import Sample

        s = Sample("check", "check", token_ids[:prompt_len], token_ids[prompt_len:],
                   [0.0] * (len(token_ids) - prompt_len), [0] * (len(token_ids) - prompt_len))
        saved, self.temperature = self.temperature, 1.0
        try:
            with torch.no_grad():
                lp, _ = self._response_logprobs(self.engine, [s], self.engine.device)
        finally:
            self.temperature = saved
        return lp[0, : len(token_ids) - prompt_len].tolist()

    # ---- checkpoint ------------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: str) -> bool:
        """DeepSpeed checkpoint (model, optimizer, LR scheduler; ZeRO partitions) plus this rank's
        torch RNG state under ``ckpt_dir``; every rank must call it. Returns True."""
        import torch

        self.engine.save_checkpoint(ckpt_dir, tag="deepspeed", save_latest=False)
        torch.save({"torch": torch.get_rng_state()}, os.path.join(ckpt_dir, f"rng_rank{self.rank}.pt"))
        return True

    def load_checkpoint(self, ckpt_dir: str) -> bool:
        """Restore what `save_checkpoint` wrote; every rank must call it.

        Raises:
            FileNotFoundError: the checkpoint lacks the DeepSpeed state or this rank's RNG file.
        """
        import torch

        rng = os.path.join(ckpt_dir, f"rng_rank{self.rank}.pt")
        if not os.path.isfile(rng):
            raise FileNotFoundError(f"checkpoint {ckpt_dir} has no RNG state for learner rank {self.rank} "
                                    "(was it written with a different learner.num_learners?)")
        path, _ = self.engine.load_checkpoint(ckpt_dir, tag="deepspeed", load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {ckpt_dir}/deepspeed")
        torch.set_rng_state(torch.load(rng)["torch"])
        return True

    def save_pretrained(self, out_dir: str) -> str | None:
        """Write the current policy as an HF model dir (rank 0); every rank must call it."""
        import shutil

        state = {n: t for n, t in self._gathered_named_params()}
        if self.rank != 0:
            return None
        self.engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        for f in os.listdir(self.model_path):
            if f.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                shutil.copy(os.path.join(self.model_path, f), out_dir)
        return out_dir
