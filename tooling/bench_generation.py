"""The ``generation`` benchmark of `relayrl bench` (issue 33): rollout tokens/s per core for the config's shapes,
`RolloutWorker` and raw vLLM side by side, and the seconds of one held-out eval of the config's ``data.eval_size``
problems as a run evaluates them; plus `wrapper_calls`, the paired generate calls the ``wrapper`` benchmark's
overhead also comes from (measured once per invocation, whichever of the two asks first).

Rollout shapes: ``rollout.prompts_per_request`` training prompts x ``rollout.group_size`` samples per call at the
run's temperature and ``max_tokens``, one worker with the config's ``rollout.num_cpus``. The eval: the rig's rollout
workers (`Session.rig`, the actors a `Trainer` has), `RolloutGroup.evaluate` with the arguments
`orchestrator.loop.Trainer.evaluate` passes (``rollout.eval_num_threads`` threads), each eval after a weight push
(as in a run: a push resets the engine's prefix cache, so an eval never finds the previous eval's prompts cached).

Left out on purpose: overlap efficiency and the learner's wait fraction (rows of ``overlap``, from its real run),
and where generation time goes inside the engine (prefill, decode, prefix hits, preemptions:
`tooling.generation_profile`, a command of its own, since each of its rows starts a fresh engine process).
"""

from __future__ import annotations

import time

from tooling.bench_math import Row, rate, row, spread_row
from tooling.bench_session import pushes

WRAPPER_REPEATS = 5  # timed generate calls per side, after one warm-up call each
EVAL_REPEATS = 3  # timed held-out evals, each after a weight push
EVAL_TARGET_S = 15.0  # issue 33: a held-out eval of the main job's 200 problems within 15 s on a 2-core node

NOTE = ("`generation`: tokens/s per core: each timed call of the `wrapper` benchmark (the same calls: "
        f"{WRAPPER_REPEATS} per side, `rollout.prompts_per_request` training prompts x `rollout.group_size` samples "
        "each) as generated tokens over its seconds, divided by the engine's threads (`int(rollout.num_cpus)`, at "
        "least 1). Held-out eval: `RolloutGroup.evaluate` of the config's `data.eval_size` held-out problems "
        "(greedy, `eval_max_tokens`, `rollout.eval_num_threads` threads) on the rollout workers of a built `Trainer`, "
        f"as the run's evals call it; {EVAL_REPEATS} evals, each after a weight push of the unchanged base weights "
        "(a push resets the prefix cache, as before every eval of a run), timed from the driver. The accuracy row "
        "is the strict exact-match share of the base policy (the run's step-0 eval). With `eval_pass_k_problems` > 0, "
        f"{EVAL_REPEATS} more evals as `Trainer.evaluate` runs them with pass@k on (`RolloutGroup.evaluate_pass_k`: "
        "the greedy episodes and k samples at the rollout temperature for each of the first `eval_pass_k_problems` "
        "problems, in the same engine calls), each after a push, and the base policy's pass@k.")


def wrapper_calls(s) -> dict[str, list[tuple[int, float]]]:
    """``{"raw": [...], "relayrl": [...]}``: ``(generated tokens, seconds)`` of each of `WRAPPER_REPEATS` timed
    calls per side (after one warm-up call each), raw vLLM (`tooling.bench_actors.RawVLLM`) and
    `RolloutWorker.generate`, in turn on the same prompts and seeds; measured once per session (kept in
    ``s.raw["wrapper"]``).

    Raises:
        RuntimeError: the Ray cluster has fewer than 2 x ``rollout.num_cpus`` CPUs.
        ray.exceptions.GetTimeoutError: a call took longer than ``rollout.request_timeout_s``.
    """
    if "wrapper" in s.raw:
        return s.raw["wrapper"]["calls_tokens_seconds"]
    import ray

    from buffer import GenerateRequest, ReplayBuffer
    from rollout.worker import RolloutWorker
    from tooling.bench_actors import RawVLLM

    cfg = s.variant("rollout.num_workers=1")
    rc = cfg.rollout
    if ray.cluster_resources().get("CPU", 0.0) + 1e-9 < 2 * rc.num_cpus:
        raise RuntimeError(f"bench wrapper needs 2 x rollout.num_cpus = {2 * rc.num_cpus:g} CPUs; the Ray cluster "
                           f"has {ray.cluster_resources().get('CPU', 0.0):g}")
    # both sides: the same actor options (those RolloutGroup gives its workers), no placement group
    env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(max(1, int(rc.num_cpus)))}}
    opts = dict(num_cpus=rc.num_cpus, num_gpus=rc.gpus_per_worker, max_concurrency=4, runtime_env=env)
    buffer = ray.remote(ReplayBuffer).options(num_cpus=0).remote()
    ours = ray.remote(RolloutWorker).options(**opts).remote(rc, cfg.data, s.model_path, 0, buffer)
    raw = ray.remote(RawVLLM).options(**opts).remote(rc, cfg.data, s.model_path)
    calls: dict[str, list] = {"raw": [], "relayrl": []}
    try:
        for i in range(WRAPPER_REPEATS + 1):  # call 0 warms both up
            problems, keys = s.take(rc.prompts_per_request)
            seed = cfg.seed * 100003 + i
            for side in ("raw", "relayrl") if i % 2 else ("relayrl", "raw"):
                t0 = time.perf_counter()
                if side == "raw":
                    tokens = ray.get(raw.generate.remote(problems, seed), timeout=rc.request_timeout_s)
                else:
                    ref = ours.generate.remote(GenerateRequest(problems, keys, [rc.group_size] * len(keys), 0, seed))
                    tokens = ray.get(ref, timeout=rc.request_timeout_s).tokens
                if i:
                    calls[side].append((tokens, time.perf_counter() - t0))
    finally:
        for actor in (raw, ours, buffer):
            ray.kill(actor)
    s.raw["wrapper"] = {"calls_tokens_seconds": calls}
    return calls


def engine_threads(num_cpus: float) -> int:
    """Threads a rollout worker's engine generates with for ``rollout.num_cpus`` (`int`, at least 1: the
    ``OMP_NUM_THREADS`` `RolloutGroup` gives its workers)."""
    return max(1, int(num_cpus))


def generation_rows(calls: dict[str, list[tuple[int, float]]], threads: int, eval_seconds: list[float],
                    eval_correct: list[list[bool]]) -> dict[str, Row]:
    """The ``generation`` rows from what was measured.

    Args:
        calls: `wrapper_calls`' ``{"raw": [(tokens, seconds), ...], "relayrl": [...]}``.
        threads: the engine's threads on each side (`engine_threads`): tokens/s per core divides by it.
        eval_seconds: seconds of each timed held-out eval.
        eval_correct: each eval's per-problem results (strict exact match), in problem order.

    Returns:
        rows (min/median/max over the repeats): raw vLLM and `RolloutWorker` tokens/s per core, their ratio
        (median of the per-call ratios, target >= 0.9: issue 33's "within 10% of raw vLLM"), eval seconds (target
        <= `EVAL_TARGET_S`), problems per eval and the eval's accuracy.

    Raises:
        ValueError: a side without calls, calls of the two sides not paired (different counts), ``threads < 1``,
            no eval, or evals of different problem counts.
    """
    if threads < 1:
        raise ValueError(f"threads = {threads}: an engine generates with at least 1 thread")
    raw, ours = calls.get("raw") or [], calls.get("relayrl") or []
    if not raw or len(raw) != len(ours):
        raise ValueError(f"need equally many paired calls per side, got {len(raw)} raw and {len(ours)} relayrl")
    if not eval_seconds or len(eval_seconds) != len(eval_correct) or len({len(c) for c in eval_correct}) != 1:
        raise ValueError(f"need one result list of the same problems per eval, got {len(eval_seconds)} eval times "
                         f"and result lists of {sorted({len(c) for c in eval_correct})} problems")
    per_core = {k: [rate(t, sec) / threads for t, sec in v] for k, v in (("raw", raw), ("relayrl", ours))}
    problems = len(eval_correct[0])
    return {
        "raw vLLM: tokens/s per core": spread_row(per_core["raw"], "tokens/s/core"),
        "relayrl RolloutWorker: tokens/s per core": spread_row(per_core["relayrl"], "tokens/s/core"),
        "RolloutWorker / raw vLLM (tokens/s, paired calls)":
            spread_row([o / r for r, o in zip(per_core["raw"], per_core["relayrl"])], "", (">=", 0.9)),
        "engine threads per worker": row(threads, "threads"),
        f"held-out eval, {problems} problems": spread_row(eval_seconds, "s", ("<=", EVAL_TARGET_S)),
        "held-out eval: accuracy (base policy)": spread_row([sum(c) / problems for c in eval_correct], "fraction"),
    }


def bench_generation(s) -> dict[str, Row]:
    """Rollout tokens/s per core, `RolloutWorker` against raw vLLM, and held-out eval seconds (`generation_rows`).

    Raises:
        ValueError: the config has no held-out problems (``data.eval_size = 0``).
        ray.exceptions.GetTimeoutError: a generate call or an eval took longer than its timeout.
    """
    from rollout.tasks import load_problems

    calls = wrapper_calls(s)
    cfg, rc = s.cfg, s.cfg.rollout
    problems = load_problems(cfg.data, "eval")
    if not problems:
        raise ValueError(f"bench generation times a held-out eval, but {s.config_path} has data.eval_size = 0; "
                         "set data.eval_size")
    s.release()  # a fresh rig: its learner has not trained, so the eval scores the base policy
    rollout = s.rig()[1]
    seconds, correct = [], []
    for _ in range(EVAL_REPEATS):
        pushes(s, repeats=1)  # a run evaluates right after a push, which resets the prefix cache
        t0 = time.perf_counter()
        # the arguments Trainer.evaluate passes
        correct.append(rollout.evaluate(problems, s.pushed_version, cfg.eval_max_tokens or rc.max_tokens,
                                        rc.request_timeout_s + rc.weight_wait_timeout_s))
        seconds.append(time.perf_counter() - t0)
    threads = engine_threads(rc.num_cpus)
    s.raw["generation"] = {"engine_threads": threads, "eval_seconds": seconds, "eval_problems": len(problems),
                           "eval_correct": [sum(c) for c in correct], "eval_num_threads": rc.eval_num_threads}
    rows = generation_rows(calls, threads, seconds, correct)
    n_pass, k = min(cfg.eval_pass_k_problems, len(problems)), cfg.eval_pass_k or rc.group_size
    if n_pass:  # the eval as Trainer.evaluate runs it with pass@k on: the sampled episodes in the same engine calls
        from orchestrator.metrics import pass_k_metrics

        pk_seconds, pk = [], []
        for _ in range(EVAL_REPEATS):
            pushes(s, repeats=1)
            t0 = time.perf_counter()
            _, counts = rollout.evaluate_pass_k(problems, n_pass, k, s.pushed_version, cfg.eval_max_tokens or
                                                rc.max_tokens, rc.request_timeout_s + rc.weight_wait_timeout_s)
            pk_seconds.append(time.perf_counter() - t0)
            pk.append(pass_k_metrics(counts, k, k)["eval/pass@k"])
        s.raw["generation"].update(pass_k_eval_seconds=pk_seconds, pass_k=pk, pass_k_problems=n_pass, k=k)
        rows[f"held-out eval + pass@{k} on {n_pass} of the problems"] = spread_row(pk_seconds, "s")
        rows[f"held-out pass@{k} (base policy)"] = spread_row(pk, "fraction")
    return rows
