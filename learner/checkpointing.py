"""`LearnerCheckpoints`: the checkpoint methods of `learner.worker.LearnerWorker` (a mixin: they use its DeepSpeed
engine ``self.engine``, ``self.cfg``, ``self.rank``, ``self.model_path`` and ``self._gathered_named_params``).

A checkpoint is DeepSpeed's (model, optimizer, LR scheduler; ZeRO partitions) plus each rank's torch RNG
state, under a local path or a storage URI; `save_pretrained` writes the policy as an HF model dir.

Left out on purpose: checkpoint formats other than DeepSpeed's (a universal checkpoint to change the
number of learner ranks on resume).
"""

from __future__ import annotations

import os


class LearnerCheckpoints:
    """Checkpoint save/load and HF export; every rank must call each method (ZeRO gathers and partitions)."""

    def save_checkpoint(self, ckpt_dir: str) -> bool:
        """DeepSpeed checkpoint (model, optimizer, LR scheduler; ZeRO partitions) plus this rank's
        torch RNG state under ``ckpt_dir`` (a local path or storage URI: on an object store this rank
        writes its part to a node-local temporary dir and uploads it); every rank must call it. Returns True."""
        import torch

        from base.storage import staged_write

        with staged_write(ckpt_dir) as local:
            # with LoRA the frozen base weights come from the model dir again, not from the checkpoint
            self.engine.save_checkpoint(local, tag="deepspeed", save_latest=False,
                                        exclude_frozen_parameters=self.cfg.lora is not None)
            torch.save({"torch": torch.get_rng_state()}, os.path.join(local, f"rng_rank{self.rank}.pt"))
        return True

    def write_probe(self, run_dir: str, token: str) -> str:
        """Write a small file ``.probe/<token>-rank<r>`` under ``run_dir`` (a local path or storage URI) where this
        rank will write its checkpoints; returns its name relative to ``run_dir``. The driver then checks it can
        see every rank's file (`orchestrator.checkpoint.check_visible`) before anything trains."""
        from base import storage

        name = f".probe/{token}-rank{self.rank}"
        storage.write_bytes(storage.join(run_dir, name), b"relayrl: a learner rank can write here\n")
        return name

    def load_checkpoint(self, ckpt_dir: str) -> bool:
        """Restore what `save_checkpoint` wrote; every rank must call it. From an object store each rank
        downloads the learner state itself into a node-local temporary dir. It downloads all of it, though
        DeepSpeed's ``load_checkpoint`` reads only part: the model-states file (under ZeRO 0-2 the one
        ``mp_rank_00_model_states.pt`` that data-parallel rank 0 wrote, which every rank loads; under ZeRO-3
        this rank's own ``zero_pp_rank_<r>_...``) and, under ZeRO 1-3, this rank's own optimizer partition
        (the other ranks' are read only with ZeRO's ``elastic_checkpoint``, which is off). Fetching the whole
        prefix keeps DeepSpeed's file naming out of this code, at the cost of downloading the other ranks'
        partitions.

        Raises:
            FileNotFoundError: the checkpoint lacks the DeepSpeed state or this rank's RNG file.
        """
        import torch

        from base.storage import local_copy

        with local_copy(ckpt_dir) as local:
            rng = os.path.join(local, f"rng_rank{self.rank}.pt")
            if not os.path.isfile(rng):
                raise FileNotFoundError(f"checkpoint {ckpt_dir} has no RNG state for learner rank {self.rank} "
                                        "(was it written with a different learner.num_learners?)")
            path, _ = self.engine.load_checkpoint(local, tag="deepspeed", load_optimizer_states=True,
                                                  load_lr_scheduler_states=True,
                                                  load_module_strict=self.cfg.lora is None)
            if path is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint under {ckpt_dir}/deepspeed")
            torch.set_rng_state(torch.load(rng)["torch"])
        return True

    def save_pretrained(self, out_dir: str) -> str | None:
        """Write the current policy as an HF model dir at ``out_dir`` (a local path or storage URI: rank 0
        writes it locally, then uploads it); every rank must call it. Returns ``out_dir`` on rank 0.

        With LoRA, ``out_dir`` holds the adapters merged into the base weights (fp32) and
        ``out_dir/adapter`` the adapter in PEFT format (``PeftModel.from_pretrained(base, out_dir/adapter)``).
        """
        if self.cfg.lora is not None:
            state = {n: t for n, t in self._gathered_named_params(adapters_only=True)}
        else:
            state = {n: t for n, t in self._gathered_named_params()}
        if self.rank != 0:
            return None
        import shutil

        from base.storage import staged_write

        with staged_write(out_dir) as local:
            if self.cfg.lora is not None:
                from learner.lora import save_merged

                save_merged(local, self.model_path, self.cfg.lora, state)
            else:
                self.engine.module.save_pretrained(local, state_dict=state, safe_serialization=True)
            for f in os.listdir(self.model_path):
                if f.startswith(("tokenizer", "special_tokens", "chat_template", "vocab", "merges")):
                    shutil.copy(os.path.join(self.model_path, f), local)
        return out_dir
