"""`LearnerGroup`: N `LearnerWorker` ranks as Ray actors, addressed as one learner.

Methods ending in ``_remote`` return ObjectRefs; the others wait with the configured timeout and
raise naming the rank that did not answer, or at once the first rank that died (its survivors are
stopped: under NCCL they would wait for it in a collective until the timeout).

Placement is decided by the caller and handed down: one Ray scheduling strategy per rank (the
orchestrator reserves the ranks together as one placement group).

Left out on purpose: an in-process mode.
"""

from __future__ import annotations

import logging
import time
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

    failed: str | None = None  # why the group stopped (a rank died during a call); it refuses calls after that
    stepped_to: int | None = None  # policy version at the end of the newest step submitted (None: none since load)

    def __init__(self, cfg: LearnerConfig, model: ModelSource | str, strategies: list, samples_per_step: int, max_tokens: int,
                 temperature: float, seed: int, worker_cls: type = LearnerWorker) -> None:
        import ray

        if len(strategies) != cfg.num_learners:
            raise ValueError(f"got {len(strategies)} scheduling strategies for learner.num_learners = "
                             f"{cfg.num_learners}; give one per rank")
        self.cfg, self.strategies = cfg, strategies
        self._args = (model, samples_per_step, max_tokens, temperature, seed)
        self._actor = ray.remote(worker_cls)
        self._start_ranks()

    def _start_ranks(self) -> None:
        """Create the rank actors (one per scheduling strategy), join them into one group, build their engines."""
        env = {"env_vars": rank_env(self.cfg)}
        model, samples_per_step, max_tokens, temperature, seed = self._args
        cfg = self.cfg
        self.ranks = [
            self._actor.options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources, runtime_env=env,
                                scheduling_strategy=self.strategies[r]).remote(
                cfg, model, r, cfg.num_learners, samples_per_step, max_tokens, temperature, seed)
            for r in range(cfg.num_learners)
        ]
        addr, port = self._get([self.ranks[0].master_address.remote()], "master_address")[0]
        self.num_params = self._get([r.setup.remote(addr, port) for r in self.ranks], "setup")[0]
        logger.info("learner group up: %d ranks, %.1fM params", len(self.ranks), self.num_params / 1e6)

    def replace_ranks(self) -> None:
        """Kill every rank (a peer died: the survivors' process group is broken) and start a new group in the same
        placement (a bundle whose node died is rescheduled by Ray); the new ranks hold the model the group started
        from until they load a snapshot or checkpoint. The group accepts calls again.

        Raises:
            TimeoutError / LearnerRankDied: a new rank did not set up (bounded by ``step_timeout_s``).
        """
        import ray

        for r in self.ranks:
            ray.kill(r, no_restart=True)
        self.failed, self.stepped_to = None, None
        self._start_ranks()

    def dead_ranks(self) -> list[int]:
        """Ranks whose actor is dead, from Ray's actor table (answers at once, even while the ranks are inside a
        call)."""
        import ray._private.state as ray_state

        dead = []
        for i, r in enumerate(self.ranks):
            info = ray_state.state.actor_table(r._actor_id.hex()) or {}
            if info.get("State") == "DEAD":
                dead.append(i)
        return dead

    def node_ids(self) -> list[str]:
        """The Ray node id of every rank, rank order (waits, bounded)."""
        return self._get([r.node_id.remote() for r in self.ranks], "node_id", timeout=60)

    def snapshot_remote(self, store, version: int) -> list:
        """Start a snapshot of policy ``version`` on every rank into ``store`` (`learner.snapshots`); one metrics
        ObjectRef per rank. Submitted right after a step, it runs right after it on every rank."""
        return [r.snapshot.remote(store, version, self.cfg.step_timeout_s) for r in self.ranks]

    def restore_snapshot(self, store, version: int) -> None:
        """Every rank loads the snapshot of ``version`` from ``store`` (waits, bounded by ``step_timeout_s``)."""
        self.stepped_to = None
        self._get([r.restore_snapshot.remote(store, version, self.cfg.step_timeout_s) for r in self.ranks],
                  "restore_snapshot")

    def _get(self, refs: list, what: str, timeout: float | None = None) -> list:
        """Wait for one call on every rank (``refs[i]``: rank i's ObjectRef) and return their results in rank order.

        Polls the ranks as they finish (as the train-step poll does, `orchestrator.learner_step.LearnerStep.done`):
        the first rank found dead raises at once, and the survivors still inside the call are killed, since under
        NCCL they would wait in a collective for their dead peer until ``step_timeout_s``; the group is then
        marked failed and refuses every later call at once. A rank that raised (not died) is reported only once
        every rank has answered, so that a peer's death, the cause, is named over its consequences.

        Args:
            refs: one ObjectRef per rank, rank order (or rank 0's alone).
            what: the call's name, for errors.
            timeout: seconds to wait in all (default ``step_timeout_s``).

        Raises:
            LearnerRankDied: a rank's process died (names the first found).
            TimeoutError: ranks that did not finish within ``timeout`` (named).
            RuntimeError: the group failed in an earlier call.
            Exception: the first error a rank raised (rank order), when no rank died.
        """
        import ray

        if self.failed is not None:
            raise RuntimeError(f"learner group refuses {what}: it failed earlier ({self.failed}); its surviving ranks "
                               "were stopped: resume the run from its last checkpoint")
        timeout = timeout or self.cfg.step_timeout_s
        deadline = time.monotonic() + timeout
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        out, errors, pending = [None] * len(refs), {}, list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"learner rank(s) {sorted(rank_of[r] for r in pending)} did not finish {what} "
                                   f"within {timeout:.0f} s")
            for ref in ready:
                try:
                    out[rank_of[ref]] = ray.get(ref)
                except ray.exceptions.RayActorError as e:  # the process is gone: name it, not its peers' errors
                    died = LearnerRankDied(rank_of[ref], what, type(e).__name__)
                    self._stop_survivors([rank_of[r] for r in pending], str(died))
                    raise died from None
                except Exception as e:  # noqa: BLE001 (re-raised below, once every rank is checked for death)
                    errors[rank_of[ref]] = e
        if errors:
            raise errors[min(errors)]
        return out

    def _stop_survivors(self, ranks: list[int], why: str) -> None:
        """Kill ``ranks`` (still inside a call whose peer died: they may never return) and mark the group failed."""
        import ray

        self.failed = why
        for r in ranks:
            logger.warning("learner rank %d stopped: %s", r, why)
            ray.kill(self.ranks[r], no_restart=True)

    def train_step_remote(self, batch_ref, version: int) -> list:
        """Start one training step (from policy ``version``) on every rank; one metrics ObjectRef per rank."""
        self.stepped_to = version + 1
        return [r.train_step.remote(batch_ref, version) for r in self.ranks]

    def version_at_next_call(self, known: int) -> int:
        """The policy version the ranks will hold when a call submitted now runs: a rank runs its calls in
        order, so after every step submitted so far, finished or not. That is the newest submitted step's end
        version, or ``known`` (the caller's version: the start, or a restored checkpoint's) when no step was
        submitted since the last `load_checkpoint` or ``known`` is newer. An export labelled with anything else
        while a step is in flight would name weights one version too old."""
        return known if self.stepped_to is None else max(known, self.stepped_to)

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

    def sequence_logprobs_remote(self, token_ids: list[int], prompt_len: int) -> list:
        """Start `sequence_logprobs` on every rank (ZeRO-3 gathers need them all); one ObjectRef per rank, rank 0's
        holding the logprobs. Submitted now, it runs after every step submitted so far, with the weights of
        `version_at_next_call`."""
        return [r.sequence_logprobs.remote(token_ids, prompt_len) for r in self.ranks]

    def sequence_logprobs(self, token_ids: list[int], prompt_len: int) -> list[float]:
        """Rank 0's logprobs of ``token_ids[prompt_len:]`` (every rank runs the forward: ZeRO-3 gathers)."""
        return self._get([r.sequence_logprobs.remote(token_ids, prompt_len) for r in self.ranks],
                         "sequence_logprobs")[0]

    def save_checkpoint(self, ckpt_dir: str) -> None:
        """Every rank writes its DeepSpeed state and RNG into ``ckpt_dir`` (waits, bounded)."""
        self._get([r.save_checkpoint.remote(ckpt_dir) for r in self.ranks], "save_checkpoint")

    def load_checkpoint(self, ckpt_dir: str) -> None:
        """Every rank restores from ``ckpt_dir`` (waits, bounded); the caller knows the version it holds."""
        self.stepped_to = None
        self._get([r.load_checkpoint.remote(ckpt_dir) for r in self.ranks], "load_checkpoint")

    def write_probes(self, run_dir: str, token: str) -> list[str]:
        """Every rank writes a probe file under ``run_dir`` (`LearnerCheckpoints.write_probe`); their names."""
        return self._get([r.write_probe.remote(run_dir, token) for r in self.ranks], "write_probe")

    def save_pretrained(self, out_dir: str) -> str:
        """Write the current policy as an HF dir; returns its path."""
        return self._get([r.save_pretrained.remote(out_dir) for r in self.ranks], "save_pretrained")[0]
