"""`RolloutWorker`: a Ray actor owning one vLLM engine (`rollout.group.RolloutGroup` holds N of them).

A worker turns problems into scored sample groups and writes them straight into the replay buffer
actor (samples never pass through the driver); the call returns only small metadata. Weight
pushes are staged on arrival (the transfer overlaps generation) and applied between requests, so a
worker switches policy version between requests and every token of a request has one version; with
``rollout.update_interval_tokens = K`` they are also applied inside a request, every K tokens
(`VLLMEngine.generate_chunked`), and each token records the version that sampled it.
A request names the oldest policy version it may be generated with (``min_version``); the worker
waits, bounded by a timeout, until it holds such weights. That is what makes the staleness bound
hold by construction (see orchestrator.loop).
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from typing import TYPE_CHECKING, Any

from base.weight_buckets import verify_checksums
from base.weight_delta import DeltaReceiver
from buffer import GenerateRequest, Problem, RolloutResult, Sample, scored_rewards
from rollout.engine_args import batch_seqs
from rollout.rewards import RewardSet, Score, score_response

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from base.adapter import LoraSpec
    from base.model_source import ModelSource
    from rollout.config import DataConfig, RolloutConfig


class RolloutWorker:
    """Generates groups with a vLLM engine; receives weights; serves eval and logprob checks.

    Answers are scored by the run's reward functions (``rollout.rewards``, a `rollout.rewards.RewardSet`).
    ``reward_fn(text, reference) -> (reward, correct)`` is the strict check behind ``correct`` and the built-in
    ``exact_match`` reward, a class attribute (subclasses swap it). Each call runs under
    ``rollout.reward_timeout_s`` and a failure marks that sample ``failed``.

    Args:
        cfg: `RolloutConfig`.
        data_cfg: `DataConfig` (prompt instruction and one-shot format).
        model: the model (`base.model_source.ModelSource`, resolved to a dir on this worker's node), or a
            local HF model dir.
        worker_index: index in the group (seeds differ per worker).
        buffer: the replay buffer: a Ray actor's name (looked up here with ``ray.get_actor``; a restartable
            actor's constructor arguments should hold no actor handle, which Ray flags at creation), an actor
            handle, or a local `ReplayBuffer` (tests).
        lora: serve LoRA adapters of this spec (pushes then carry adapter tensors only); None: full weights.

    Raises:
        FileNotFoundError: the model is not on this node and cannot be copied here.
        ValueError: no Ray actor has the name ``buffer``; a reward function or environment that cannot be
            imported on this node (one line naming it).
    """

    reward_fn = staticmethod(score_response)

    def __init__(self, cfg: RolloutConfig, data_cfg: DataConfig, model: ModelSource | str, worker_index: int,
                 buffer: Any, lora: LoraSpec | None = None) -> None:
        import torch

        # user code first: an import that fails on this node fails before the engine's slow start; the worker never
        # reads the data, so its columns are not known here (the driver checked the signatures against them)
        self.rewards = RewardSet(cfg.rewards, cfg.reward_timeout_s, None, check=self.reward_fn)
        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        from base.model_source import local_model_dir
        from rollout.engine import VLLMEngine

        model_path = local_model_dir(model)
        if isinstance(buffer, str):
            import ray

            buffer = ray.get_actor(buffer)
        self.cfg, self.data_cfg, self.index, self.buffer = cfg, data_cfg, worker_index, buffer
        self.engine = VLLMEngine(
            model_path, cfg.dtype, cfg.kv_cache_memory_bytes, cfg.max_model_len, cfg.seed + worker_index, lora,
            cfg.lora_serving,
            kv_cache_seqs=batch_seqs(data_cfg.eval_size, cfg.num_workers, cfg.prompts_per_request, cfg.group_size),
            gpu_memory_utilization=cfg.gpu_memory_utilization, tensor_parallel_size=cfg.tensor_parallel_size,
            block_size=cfg.block_size,
        )
        warm_up_seconds = self.engine.warm_up()  # the first sampling call is slow: not on a real request
        logger.info("rollout worker %d: first sampling call %.1f s", worker_index, warm_up_seconds)
        self.version = 0
        self._pending: tuple[int, list[bytes]] | None = None
        self._delta_in = DeltaReceiver()  # the held version, base of ``weights.type = "delta"`` pushes
        self._cond = threading.Condition()
        self._engine_lock = threading.Lock()
        self._load_seconds = 0.0
        self._requests = 0
        self._check_environment()

    # ---- weights -------------------------------------------------------------------------
    def receive_weights(self, version: int, buckets: list[bytes] | None = None) -> dict[str, float]:
        """Stage the weights of policy ``version``; apply them now if the engine is idle, else before the
        next request (or token chunk). The one entry point of every weight transport.

        Args:
            version: the policy version pushed.
            buckets: its weight buckets (`base.weight_buckets` format), or None: read one push from this
                worker's weight group (`join_weight_group`), whose header must name ``version``.

        Returns:
            ``{"bytes": ..., "applied": 0/1, "load_seconds": ...}``.

        Raises:
            RuntimeError: no weight group, or it delivered another version than ``version``.
            base.weight_buckets.WeightChecksumError: the bytes received differ from the checksums made where the
                buckets were made (`base.weight_buckets.verify_checksums`); nothing is staged or loaded.
            TimeoutError / RuntimeError: the group's receive timed out or lost its source (`WeightGroup.receive`).
        """
        if buckets is None:
            group = getattr(self, "weight_group", None)
            if group is None:
                raise RuntimeError(f"rollout worker {self.index} is in no weight group; join one before a broadcast")
            got, buckets = group.receive()
            if got != version:
                raise RuntimeError(f"rollout worker {self.index} expected a broadcast of policy version {version}, "
                                   f"got version {got}")
        nbytes = float(sum(len(b) for b in buckets))
        buckets = verify_checksums(buckets, f"rollout worker {self.index}", version)  # before anything is loaded
        buckets = self._delta_in.receive(version, buckets, self.cfg.weight_wait_timeout_s)  # a delta: full weights
        if buckets is None:  # not newer than a push already received (out of order): nothing to load
            return {"bytes": nbytes, "applied": 0.0, "load_seconds": 0.0}
        with self._cond:
            if self._pending is None or version >= self._pending[0]:
                self._pending = (version, buckets)
            self._cond.notify_all()
        applied, seconds = 0.0, 0.0
        if self._engine_lock.acquire(blocking=False):
            try:
                t0 = time.perf_counter()
                applied = float(self._apply_pending())
                seconds = time.perf_counter() - t0
            finally:
                self._engine_lock.release()
        return {"bytes": nbytes, "applied": applied, "load_seconds": seconds}

    def join_weight_group(self, backend: str, addr: str, port: int, rank: int, world_size: int, timeout_s: float,
                          name: str) -> None:
        """Join the weight-broadcast group ``name`` as ``rank`` (`base.weight_group.WeightGroup`); later
        ``receive_weights(version)`` calls read from it."""
        from base.weight_group import WeightGroup

        self.weight_group = None  # the previous generation's group goes first
        self.weight_group = WeightGroup(backend, addr, port, rank, world_size, timeout_s, name)

    def _apply_pending(self) -> bool:
        """Load staged weights (caller holds the engine lock). Returns whether it loaded any."""
        with self._cond:
            pending, self._pending = self._pending, None
        if pending is None or pending[0] < self.version:  # the version served again: a re-push, loaded
            return False
        t0 = time.perf_counter()
        self.engine.load_weights(pending[1])
        self._load_seconds += time.perf_counter() - t0
        with self._cond:
            self.version = pending[0]
            self._cond.notify_all()
        logger.info("worker %d now serves policy version %d", self.index, self.version)
        return True

    def _wait_for_version(self, min_version: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.version < min_version and (self._pending is None or self._pending[0] < min_version):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"rollout worker {self.index}: no weights of policy version >= {min_version} "
                        f"arrived within {timeout_s:.0f} s (serving version {self.version})"
                    )
                self._cond.wait(timeout=min(left, 5.0))

    def get_version(self) -> int:
        """Policy version currently served."""
        return self.version

    def canary_tokens(self, text: str, max_tokens: int) -> list[int]:
        """Token ids of ``text`` (this engine's tokenizer), at most ``max_tokens``: the canary of push checks."""
        return list(self.engine.tokenizer.encode(text))[:max_tokens]

    def score_canary(self, token_ids: list[int], prompt_len: int, version: int) -> dict:
        """Engine logprobs of ``token_ids[prompt_len:]`` (temperature 1, nats) once the weights of policy
        ``version`` or newer are applied (staged weights load first; waits up to ``weight_wait_timeout_s``):
        ``{"version": the version scored, "logprobs": [...], "seconds": the scoring}``
        (`orchestrator.weight_verify`)."""
        self._wait_for_version(version, self.cfg.weight_wait_timeout_s)
        with self._engine_lock:
            self._apply_pending()
            t0 = time.perf_counter()
            lp = self.engine.sequence_logprobs(token_ids, prompt_len)
            return {"version": self.version, "logprobs": lp, "seconds": time.perf_counter() - t0}

    # ---- generation ----------------------------------------------------------------------
    def _check_environment(self) -> None:
        """Build the episode settings (the environment's `Environment.worker_config`) and the turn encoder; fail
        at start-up on bad environment options, a template without incremental turns, or what the environment's
        `Environment.check_worker` finds missing on this node."""
        from rollout.envs import environment_class, make_environment
        from rollout.episode import TurnEncoder

        cls = environment_class(self.cfg.env.type)
        self.env_cfg = env = cls.worker_config(self.cfg.env, self.cfg, self.data_cfg)
        make_environment(env, Problem("check/0", "1 + 1", "2")).close()
        self._encoder = TurnEncoder(self.engine.tokenizer)
        line = cls.check_worker(env)
        if line:
            logger.info("%s", line)

    def _scorer(self, problem: Problem):
        """The `rollout.envs.base.Scorer` of episodes about ``problem``: the run's reward functions
        (`RewardSet.score`) with the problem's question (or its messages) as the prompt and its data row's
        columns as keywords."""
        def score(text: str, reference: str) -> Score:
            return self.rewards.score(problem.question, text, reference, problem.columns, problem.messages)
        return score

    def generate(self, req: GenerateRequest) -> RolloutResult:
        """Roll out ``req.sizes[i]`` episodes of problem ``i`` (a GRPO group) from one reset seed, played by
        `rollout.episode.run_episodes` in ``rollout.env`` (a single-turn task is the one-step episode), and add
        the groups to the buffer. Weights staged meanwhile load between turns (and every
        ``update_interval_tokens`` inside a turn), each token keeping the version that sampled it.

        Returns the `RolloutResult` (small metadata; the samples went to the buffer).

        Raises:
            TimeoutError: weights of ``req.min_version`` did not arrive in time.
            RuntimeError: more than ``rollout.env.max_failure_frac`` of the request's episodes failed in the
                environment (reward-function failures are counted apart, as ``reward_failures``); names it.
            rollout.episode.HungWorkerError: this worker holds more than ``rollout.env.max_hung_steps`` environment
                calls abandoned past ``rollout.env.step_timeout_s``, before this request (nothing was played) or
                after it (nothing was added to the buffer); the driver restarts the worker and re-issues the groups.
        """
        from rollout.episode import check_hung

        env_cfg = self.env_cfg
        episodes, load_seconds = self._play(list(req.problems), list(req.sizes), req.min_version, req.seed,
                                            self.cfg.temperature, self.cfg.max_tokens)
        check_hung(env_cfg)  # this request left one hung call too many: none of its groups go to the buffer
        flat = [e for g in episodes for e in g]
        failed = [e for e in flat if e.status == "failed" and not e.reward_error]
        if len(failed) > env_cfg.max_failure_frac * len(flat):
            raise RuntimeError(f"environment {env_cfg.type!r}: {len(failed)} of {len(flat)} episodes failed (more than "
                               f"rollout.env.max_failure_frac = {env_cfg.max_failure_frac:g}); first: {failed[0].error}")
        groups = [[e.to_sample(p.prompt_id, key, p.answer) for e in g]
                  for p, key, g in zip(req.problems, req.keys, episodes)]
        added = _call(self.buffer.add_groups, groups)
        self._requests += 1
        versions = [s.policy_versions for g in groups for s in g]
        return RolloutResult(
            worker=self.index, kept_keys=tuple(added["kept_ids"]),
            group_rewards=tuple((g[0].prompt_id, tuple(scored_rewards(g))) for g in groups),
            samples=len(flat), tokens=sum(sum(e.loss_mask) for e in flat),
            reward_failures=sum(bool(e.reward_error) for e in flat),
            mixed_version_samples=sum(len(set(v)) > 1 for v in versions), load_seconds=load_seconds,
            env_failures=len(failed), tool_failures=sum(e.tool_failures for e in flat),
            turns=sum(len(e.texts) for e in flat), reward_terms=_reward_terms(flat))

    def _play(self, problems: list[Problem], sizes: list[int], min_version: int, seed: int | None,
              temperature: float, max_tokens: int, greedy_groups: int = 0):
        """Play ``sizes[i]`` episodes of ``problems[i]`` from one reset seed; returns ``(episodes,
        seconds spent loading staged weights)``. Staged weights load between turns (and every
        ``update_interval_tokens`` inside one). With ``greedy_groups = G > 0`` the first G groups are played at
        temperature 0 and the others at ``temperature``, in the same engine calls (`_mixed_sample`)."""
        from rollout.envs import make_environment
        from rollout.episode import Episode, run_episodes

        c = self.cfg
        self._wait_for_version(min_version, c.weight_wait_timeout_s)
        calls = [0]

        def sample(prompts, n, budget):
            if greedy_groups:
                return self._mixed_sample(episodes[:greedy_groups], prompts, n, budget, temperature)
            if temperature == 0.0 and max(n) > 1:  # greedy: vLLM takes n = 1 only; equal contexts go one by one
                outs, vers = sample([p for p, k in zip(prompts, n) for _ in range(k)], [1] * sum(n), budget)
                at = [sum(n[:i]) for i in range(len(n) + 1)]
                return ([[c for g in outs[a:b] for c in g] for a, b in zip(at, at[1:])],
                        [[v for g in vers[a:b] for v in g] for a, b in zip(at, at[1:])])
            call_seed = None if seed is None else seed + 7919 * calls[0]
            calls[0] += 1
            if c.update_interval_tokens:
                return self.engine.generate_chunked(prompts, n, budget, c.update_interval_tokens,
                                                    lambda: (self._apply_pending(), self.version)[1],
                                                    temperature, c.top_p, call_seed)
            self._apply_pending()  # weights pushed during the previous turn serve this one
            outs = self.engine.generate(prompts, n, budget, temperature, c.top_p, call_seed)
            return outs, [[[self.version] * len(x.token_ids) for x in g] for g in outs]

        with self._engine_lock:
            loaded_before = self._load_seconds
            episodes = [[Episode(make_environment(self.env_cfg, p, self._scorer(p))) for _ in range(k)]
                        for p, k in zip(problems, sizes)]
            seeds = [zlib.crc32(p.prompt_id.encode()) for p in problems]  # one reset seed per group
            run_episodes(episodes, seeds, sample, self._encoder, self.env_cfg, max_tokens, c.max_model_len)
            load_seconds = self._load_seconds - loaded_before
        return episodes, load_seconds

    def _mixed_sample(self, greedy: list, prompts: list[list[int]], n: list[int], budget: int, temperature: float):
        """The sample function of a `_play` with greedy groups: one engine call in which, for each context, the
        samples of the greedy episodes (the running episodes of ``greedy`` whose ids so far equal it) are requested
        at temperature 0, one request each (vLLM's greedy takes n = 1), and the rest at ``temperature``. The greedy
        groups come first in `_play`'s groups, so their episodes come first in each context's episodes
        (`rollout.episode.run_episodes` keeps the episodes' order) and take the first completions."""
        from collections import Counter

        at_zero = Counter(tuple(e.prompt_ids + e.response_ids) for g in greedy for e in g if e.status == "running")
        ps, ks, ts, parts = [], [], [], []
        for p, k in zip(prompts, n):
            g = min(at_zero.get(tuple(p), 0), k)
            reqs = [(1, 0.0)] * g + ([(k - g, temperature)] if k > g else [])
            ps += [p] * len(reqs)
            ks += [r[0] for r in reqs]
            ts += [r[1] for r in reqs]
            parts.append(len(reqs))
        self._apply_pending()
        outs = self.engine.generate(ps, ks, budget, ts, self.cfg.top_p, None)
        grouped, at = [], 0
        for m in parts:
            grouped.append([x for o in outs[at:at + m] for x in o])
            at += m
        return grouped, [[[self.version] * len(x.token_ids) for x in g] for g in grouped]

    def evaluate(self, problems: list[Problem], min_version: int, max_tokens: int) -> list[bool]:
        """One greedy (temperature 0) episode per problem, at most ``max_tokens`` tokens per turn; returns
        whether each was correct, as its environment says (single-turn: strict exact match)."""
        return [t["correct"] for t in self.greedy_transcripts(problems, min_version, max_tokens)]

    def evaluate_pass_k(self, problems: list[Problem], sampled: list[bool], k: int, min_version: int,
                        max_tokens: int) -> tuple[list[bool], list[int]]:
        """`evaluate` and, for each problem with ``sampled[i]``, ``k`` episodes at ``rollout.temperature`` (the
        data pass@k is estimated from, `orchestrator.metrics.pass_k_metrics`), in the same engine calls.

        Returns:
            ``(correct, counts)``: the greedy episode's correctness per problem, and per sampled problem (in
            ``problems``' order) how many of its ``k`` episodes were correct (0..k).

        Raises:
            ValueError: ``sampled`` and ``problems`` differ in length, or ``k`` < 1.
        """
        if len(sampled) != len(problems) or k < 1:
            raise ValueError(f"evaluate_pass_k: {len(sampled)} sampled flags for {len(problems)} problems, k = {k} "
                             "(one flag per problem, k >= 1)")
        chosen = [p for p, s in zip(problems, sampled) if s]
        episodes = self._eval_play(problems, chosen, k, min_version, max_tokens)
        return ([g[0].correct for g in episodes[:len(problems)]],
                [sum(e.correct for e in g) for g in episodes[len(problems):]])

    def _eval_play(self, problems: list[Problem], sampled: list[Problem], k: int, min_version: int,
                   max_tokens: int) -> list:
        """One greedy episode per problem of ``problems`` (its groups first), then ``k`` at the rollout temperature
        per problem of ``sampled``, with ``rollout.eval_num_threads`` threads when set (the learner waits for the
        eval, so its core is free); returns the groups of episodes."""
        import torch

        threads = self.cfg.eval_num_threads or max(1, int(self.cfg.num_cpus))
        # torch._C's own setter: on CPU vLLM replaces torch.set_num_threads with a no-op once its engine is up
        before = torch.get_num_threads()
        torch._C.set_num_threads(threads)
        try:
            if not sampled:
                episodes, *_ = self._play(problems, [1] * len(problems), min_version, None, 0.0, max_tokens)
            else:
                episodes, *_ = self._play(list(problems) + list(sampled), [1] * len(problems) + [k] * len(sampled),
                                          min_version, None, self.cfg.temperature, max_tokens,
                                          greedy_groups=len(problems))
        finally:
            torch._C.set_num_threads(before)
        return episodes

    def greedy_transcripts(self, problems: list[Problem], min_version: int, max_tokens: int) -> list[dict]:
        """The greedy episodes of `evaluate`, as records to read: per problem ``turns`` (the assistant's decoded
        turns, in order), ``reward`` (the episode's, unitless), ``correct`` and ``status``. Generates with
        ``rollout.eval_num_threads`` threads when set (the learner waits for the eval, so its core is free)."""
        episodes = self._eval_play(problems, [], 0, min_version, max_tokens)
        return [{"prompt_id": p.prompt_id, "turns": list(g[0].texts), "reward": g[0].reward,
                 "correct": g[0].correct, "status": g[0].status} for p, g in zip(problems, episodes)]

    def sequence_logprobs(self, token_ids: list[int], prompt_len: int, min_version: int = 0) -> list[float]:
        """Engine logprobs of ``token_ids[prompt_len:]`` (temperature 1), after applying staged weights."""
        self._wait_for_version(min_version, self.cfg.weight_wait_timeout_s)
        with self._engine_lock:
            self._apply_pending()
            return self.engine.sequence_logprobs(token_ids, prompt_len)

    def stats(self) -> dict[str, float]:
        """Seconds spent loading weights, requests served, version."""
        return {"load_seconds": self._load_seconds, "requests": float(self._requests),
                "version": float(self.version)}


def _reward_terms(episodes) -> tuple[tuple[str, float, int, int], ...]:
    """Per reward function over ``episodes``: ``(name, sum of its values, samples it applied to, samples it
    failed)`` (`buffer.RolloutResult.reward_terms`)."""
    terms: dict[str, list] = {}
    for e in episodes:
        for name, value in e.reward_terms.items():
            t = terms.setdefault(name, [0.0, 0, 0])
            if value is not None:
                t[0], t[1] = t[0] + value, t[1] + 1
        for name in e.reward_failed:
            terms.setdefault(name, [0.0, 0, 0])[2] += 1
    return tuple((name, float(s), n, f) for name, (s, n, f) in sorted(terms.items()))


def _call(method, *args):
    """Call ``method`` locally or, for a Ray actor method, remotely and wait (bounded)."""
    if hasattr(method, "remote"):
        import ray

        return ray.get(method.remote(*args), timeout=300)
    return method(*args)
