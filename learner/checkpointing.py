"""`LearnerCheckpoints`: the checkpoint methods of `learner.worker.LearnerWorker` (a mixin: they use its DeepSpeed
engine ``self.engine``, ``self.cfg``, ``self.rank``, ``self.model_path`` and ``self._gathered_named_params``).

A checkpoint is DeepSpeed's (model, optimizer, LR scheduler; ZeRO partitions) plus each rank's torch RNG
state, under a local path or a storage URI; `save_pretrained` writes the policy as an HF model dir. On resume
from an object store each rank fetches only the files it reads (`rank_checkpoint_files`) into a dir the ranks
of its node share, so a file several ranks read is fetched once per node.

Left out on purpose: checkpoint formats other than DeepSpeed's (a universal checkpoint to change the
number of learner ranks on resume).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Iterable

from base.model_source import cache_dir

logger = logging.getLogger(__name__)

DS_TAG = "deepspeed"
"""The DeepSpeed tag every checkpoint is saved and loaded with: ``<ckpt_dir>/deepspeed/...``. Saved with
``save_latest=False`` and loaded with this explicit tag, so no ``latest`` file is written or read."""


def rank_checkpoint_files(zero_stage: int, rank: int, bf16: bool, present: Iterable[str]) -> list[str] | None:
    """The files of a learner checkpoint dir that learner rank ``rank`` reads when it loads it, as paths
    relative to that dir; None when one of them is not in ``present`` (then the caller fetches everything).

    They are this rank's RNG file ``rng_rank<rank>.pt`` and what DeepSpeed 0.19.8's ``load_checkpoint(tag,
    load_optimizer_states=True)`` opens for data-parallel rank ``rank`` without model or pipeline parallelism
    (``DeepSpeedEngine._load_checkpoint`` and ``_get_all_zero_checkpoint_state_dicts`` in
    ``deepspeed/runtime/engine.py``):

    - the model states: under ZeRO 0-2 the one ``mp_rank_00_model_states.pt`` that rank 0 wrote and every
      rank reads (under ZeRO-0 it also holds the optimizer state); under ZeRO-3 this rank's own
      ``zero_pp_rank_<rank>_mp_rank_00_model_states.pt``;
    - under ZeRO 1-3 this rank's optimizer partition ``[bf16_]zero_pp_rank_<rank>_mp_rank_00_optim_states.pt``
      (DeepSpeed opens the other ranks' only with ZeRO's ``elastic_checkpoint``, off in `learner.ds_config`).

    The names come from DeepSpeed's own naming helpers (``_get_ckpt_name``, ``_get_rank_zero_ckpt_name``),
    called with the few engine attributes they read, so a renaming in DeepSpeed changes them here too.

    Args:
        zero_stage: the ZeRO stage the checkpoint was written and is loaded with (``learner.zero_stage``, 0-3).
        rank: the learner rank (its data-parallel rank), ``>= 0``.
        bf16: whether the engine runs in bf16 (``learner.dtype = "bf16"``: DeepSpeed prefixes ``bf16_``).
        present: paths (relative to the checkpoint dir, ``/``-separated) of the files the checkpoint has.

    Raises:
        ValueError: ``zero_stage`` is not 0-3 or ``rank`` is negative.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank!r}")
    from deepspeed.runtime.engine import DeepSpeedEngine

    class _Names:  # what the naming helpers read of an engine: no model parallelism, ZeRO-3 or not
        checkpoint_mp_rank = 0
        _get_zero_ckpt_prefix = DeepSpeedEngine._get_zero_ckpt_prefix

        def zero_optimization_partition_weights(self) -> bool:
            return zero_stage == 3

    names = [DeepSpeedEngine._get_ckpt_name(_Names(), "", DS_TAG, pp_placeholder=str(rank))]
    if zero_stage > 0:
        names.append(DeepSpeedEngine._get_rank_zero_ckpt_name(_Names(), "", DS_TAG, mp_rank=0, dp_rank=rank,
                                                              bf16_mode=bf16))
    names = [n.replace(os.sep, "/") for n in names] + [f"rng_rank{rank}.pt"]
    have = set(present)
    return names if all(n in have for n in names) else None


def shared_download_dir(ckpt_uri: str) -> str:
    """The node-local dir the learner ranks of one group fetch checkpoint ``ckpt_uri`` into: under
    `base.model_source.cache_dir`, named by a hash of the URI and of the group's rendezvous address
    (``MASTER_ADDR:MASTER_PORT``, the same on every rank), so two groups loading one checkpoint on a node
    (two runs resuming from it) do not remove each other's files."""
    group = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')}"
    key = hashlib.sha256(f"{ckpt_uri}\n{group}".encode()).hexdigest()[:32]
    return str(cache_dir() / "checkpoint-downloads" / key)


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
            self.engine.save_checkpoint(local, tag=DS_TAG, save_latest=False,
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
        """Restore what `save_checkpoint` wrote; every rank must call it. From an object store each rank fetches
        only the files it reads (`rank_checkpoint_files`: the model-states file, its own optimizer partition
        and RNG state) into its node's `shared_download_dir`, where a file another rank of the node already
        fetched (the ZeRO 0-2 model-states file every rank reads) is not fetched again; it logs what it fetched
        ("learner rank <r> fetched <n> of <m> checkpoint files ..."). The ranks then wait for each other (a
        barrier, bounded by ``learner.step_timeout_s``) and remove the dir. A checkpoint lacking one of those
        files (another DeepSpeed version's names) is fetched whole into a private dir, with a warning.

        Raises:
            FileNotFoundError: the checkpoint lacks the DeepSpeed state or this rank's RNG file.
            TimeoutError: another rank's fetch of a shared file took over ``learner.step_timeout_s``.
        """
        from base import storage

        if not storage.is_remote(ckpt_dir):
            self._load_local(storage.local_path(ckpt_dir), ckpt_dir)
            return True
        present = storage.files_under(ckpt_dir)
        if f"rng_rank{self.rank}.pt" not in present:
            raise self._no_rng(ckpt_dir)
        names = rank_checkpoint_files(self.cfg.zero_stage, self.rank, self.cfg.dtype == "bf16", present)
        if names is None:
            logger.warning("learner rank %d: checkpoint %s lacks a file DeepSpeed %s reads for this rank (its "
                           "names for zero_stage %d); fetching all %d files of it", self.rank, ckpt_dir,
                           _deepspeed_version(), self.cfg.zero_stage, len(present))
            with storage.local_copy(ckpt_dir) as local:
                self._load_local(local, ckpt_dir)
            return True
        import torch

        local = shared_download_dir(ckpt_dir)
        try:
            fetched, nbytes = storage.fetch_files(ckpt_dir, names, local, timeout_s=self.cfg.step_timeout_s)
            logger.info("learner rank %d fetched %d of %d checkpoint files (%.1f MB) from %s: %s; already on this "
                        "node: %s", self.rank, len(fetched), len(names), nbytes / 2**20, ckpt_dir,
                        ",".join(fetched) or "-", ",".join(n for n in names if n not in fetched) or "-")
            self._load_local(local, ckpt_dir)
            if torch.distributed.is_initialized():
                torch.distributed.barrier()  # every rank of this node has read the files it shares
        finally:
            shutil.rmtree(local, ignore_errors=True)
        return True

    def _load_local(self, local: str, ckpt_dir: str) -> None:
        """Load the checkpoint from the local dir ``local`` (``ckpt_dir`` names it in errors)."""
        import torch

        rng = os.path.join(local, f"rng_rank{self.rank}.pt")
        if not os.path.isfile(rng):
            raise self._no_rng(ckpt_dir)
        path, _ = self.engine.load_checkpoint(local, tag=DS_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True,
                                              load_module_strict=self.cfg.lora is None)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint under {ckpt_dir}/{DS_TAG}")
        torch.set_rng_state(torch.load(rng)["torch"])

    def _no_rng(self, ckpt_dir: str) -> FileNotFoundError:
        return FileNotFoundError(f"checkpoint {ckpt_dir} has no RNG state for learner rank {self.rank} "
                                 "(was it written with a different learner.num_learners?)")

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


def _deepspeed_version() -> str:
    import deepspeed

    return deepspeed.__version__
