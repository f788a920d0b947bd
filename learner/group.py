"""`LearnerGroup`: N `LearnerWorker` ranks as Ray actors, addressed as one learner.

Methods ending in ``_remote`` return ObjectRefs; the others wait with the configured timeout and
raise naming the rank that did not answer.

Placement is decided by the caller and handed down: one Ray scheduling strategy per rank (the
orchestrator reserves the ranks together as one placement group).

Left out on purpose: an in-process mode.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from learner.config import LearnerConfig
from learner.metrics import Metrics, merge
from learner.worker import LearnerWorker

if TYPE_CHECKING:
    from base.model_source import ModelSource

logger = logging.getLogger(__name__)


class LearnerRankDied(RuntimeError):
    """A learner rank's process died during a call (``rank``: its index, ``what``: the call). Its peers'
    errors in the same call (a collective whose peer vanished) are consequences, so this one is raised."""

    def __init__(self, rank: int, what: str, cause: str) -> None:
        super().__init__(f"learner rank {rank} died during {what} ({cause})")
        self.rank, self.what = rank, what


def rank_env(cfg: LearnerConfig) -> dict[str, str]:
    """Environment variables of every learner rank's process.

    OpenMP threads and wait policy as configured (spinning threads starve the other processes on a small
    machine), DeepSpeed's accelerator, and on CPU TorchDynamo off (``TORCHDYNAMO_DISABLE=1``): nothing in the
    learner is compiled, but DeepSpeed's Muon optimizer module calls ``torch.compile`` when it is imported,
    which loads TorchInductor: ~2 s of each rank's 5-6 s set-up on CPU.
    """
    env = {"OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu" if not cfg.num_gpus else "cuda",
           "OMP_NUM_THREADS": str(cfg.torch_threads or max(1, int(cfg.num_cpus)))}
    if not cfg.num_gpus:
        env["TORCHDYNAMO_DISABLE"] = "1"
    return env


class LearnerGroup:
    """Creates the ranks, joins them into one DeepSpeed process group, fans calls out.

    Args:
        cfg: `LearnerConfig`.
        model: the model (`base.model_source.ModelSource`) or a local HF model dir every node sees.
        strategies: one Ray scheduling strategy per rank (``cfg.num_learners`` of them).
        samples_per_step, max_tokens, temperature, seed: as `LearnerWorker`.
        worker_cls: `LearnerWorker` or a subclass.

    Raises:
        ValueError: not one scheduling strategy per rank.
        TimeoutError: a rank did not finish setup in time.
    """

    def __init__(self, cfg: LearnerConfig, model: ModelSource | str, strategies: list, samples_per_step: int, max_tokens: int,
                 temperature: float, seed: int, worker_cls: type = LearnerWorker) -> None:
        import ray

        if len(strategies) != cfg.num_learners:
            raise ValueError(f"got {len(strategies)} scheduling strategies for learner.num_learners = "
                             f"{cfg.num_learners}; give one per rank")
        self.cfg = cfg
        env = {"env_vars": rank_env(cfg)}
        actor = ray.remote(worker_cls)
        self.ranks = [
            actor.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources, runtime_env=env,
                          scheduling_strategy=strategies[r]).remote(
                cfg, model, r, cfg.num_learners, samples_per_step, max_tokens, temperature, seed)
            for r in range(cfg.num_learners)
        ]
        addr, port = self._get([self.ranks[0].master_address.remote()], "master_address")[0]
        self.num_params = self._get([r.setup.remote(addr, port) for r in self.ranks], "setup")[0]
        logger.info("learner group up: %d ranks, %.1fM params", len(self.ranks), self.num_params / 1e6)

    def _get(self, refs: list, what: str, timeout: float | None = None):
        import ray

        timeout = timeout or self.cfg.step_timeout_s
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        if len(ready) < len(refs):
            missing = [i for i, r in enumerate(refs) if r not in ready]
            raise TimeoutError(f"learner rank(s) {missing} did not finish {what} within {timeout:.0f} s")
        out, first_error = [], None
        for rank, ref in enumerate(refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:  # the process is gone: name it, not its peers' errors
                raise LearnerRankDied(rank, what, type(e).__name__) from None
            except Exception as e:  # noqa: BLE001 (re-raised below, once every rank is checked for death)
                first_error = first_error or e
        if first_error is not None:
            raise first_error
        return out

    def train_step_remote(self, batch_ref, version: int) -> list:
        """Start one training step (from policy ``version``) on every rank; one metrics ObjectRef per rank."""
        return [r.train_step.remote(batch_ref, version) for r in self.ranks]

    @staticmethod
    def merge_metrics(per_rank: list[Metrics]) -> dict[str, float]:
        """Combine the ranks' step metrics (`train_step_remote`'s results), each key as the rank declared it
        (`learner.metrics.merge`: sum, mean, max, rank 0's, token-weighted mean).

        Raises:
            ValueError / TypeError: a metric without a declared reduction (`learner.metrics.merge`).
        """
        return merge(per_rank)

    def export_weights_remote(self, dtype: str, bucket_bytes: int):
        """Export full weights; returns ``(buckets_ref, metrics_ref)`` of rank 0."""
        refs = [r.export_weights.options(num_returns=2).remote(dtype, bucket_bytes) for r in self.ranks]
        return refs[0]

    def master_address(self) -> tuple[str, int]:
        """Rank 0's node address and a free port on it, for a group it hosts (waits, bounded)."""
        return self._get([self.ranks[0].master_address.remote()], "master_address", timeout=60)[0]

    def join_weight_group_remote(self, backend: str, addr: str, port: int, world_size: int, timeout_s: float,
                                 name: str) -> list:
        """Rank 0 joins weight group ``name`` as its source (group rank 0); one ObjectRef."""
        return [self.ranks[0].join_weight_group.remote(backend, addr, port, world_size, timeout_s, name)]

    def broadcast_weights_remote(self, version: int, dtype: str, bucket_bytes: int) -> list:
        """Every rank exports (ZeRO-3 gathers need all of them), rank 0 broadcasts ``version`` to its weight
        group; one ObjectRef per rank, rank 0's holding the export and broadcast metrics."""
        return [r.broadcast_weights.remote(version, dtype, bucket_bytes) for r in self.ranks]

    def probe_remote(self, groups_ref, version: int, num_samples: int) -> list:
        """Start the sentinel's forward (`LearnerWorker.probe`) on every rank; one ObjectRef per rank, rank 0's
        holding the gap. Submitted before a step, it runs before that step on every rank (actor calls run in
        order), so it scores with the weights of ``version``."""
        return [r.probe.remote(groups_ref, version, num_samples) for r in self.ranks]

    def sequence_logprobs(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Rank 0's logprobs of ``token_ids[prompt_len:]`` (every rank runs the forward: ZeRO-3 gathers)."""
        return self._get([r.sequence_logprobs.remote(token_ids, prompt_len) for r in self.ranks],
                         "sequence_logprobs")[0]

    def save_checkpoint(self, ckpt_dir: str) -> None:
        """Every rank writes its DeepSpeed state and RNG into ``ckpt_dir`` (waits, bounded)."""
        self._get([r.save_checkpoint.remote(ckpt_dir) for r in self.ranks], "save_checkpoint")

    def load_checkpoint(self, ckpt_dir: str) -> None:
        """Every rank restores from ``ckpt_dir`` (waits, bounded)."""
        self._get([r.load_checkpoint.remote(ckpt_dir) for r in self.ranks], "load_checkpoint")

    def save_pretrained(self, out_dir: str) -> str:
        """Write the current policy as an HF dir; returns its path."""
        return self._get([r.save_pretrained.remote(out_dir) for r in self.ranks], "save_pretrained")[0]
