"""Run metrics: one JSONL line and one set of TensorBoard scalars per learner step, and Weights &
Biases when ``metrics.wandb_project`` is set.

Keys are ``component/name`` (``rollout/reward_mean``, ``off_policy/staleness_max``...). Every line
also carries ``step`` and ``time/elapsed_s`` (wall clock since the run started). The W&B run id is
the run dir's name, so a resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


def truncate_jsonl(path: Path, max_step: int) -> list[dict]:
    """Drop records of ``path`` with ``step > max_step`` (rewritten atomically); returns the kept records
    (none if the file does not exist)."""
    if not path.is_file():
        return []
    kept = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    kept = [r for r in kept if r.get("step", 0) <= max_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)
    return kept


def held_out_metrics(correct: list[bool], start: list[bool] | None) -> dict[str, float]:
    """Held-out accuracy with its standard error, and its gain over the start policy's eval.

    ``correct`` and ``start`` are per-problem results (strict exact match) on the same held-out problems
    in the same order; ``start`` is None before the start eval. The gain's standard error is that of a
    paired difference, ``std(d) / sqrt(n)`` with ``d_i = correct_i - start_i`` (sample std, ``n - 1``):
    both evals score the same problems, so it is smaller than the unpaired ``sqrt(se_a^2 + se_b^2)``
    whenever the two evals agree on most problems. Keys: ``eval/accuracy``, ``eval/accuracy_se``,
    ``eval/gain`` and ``eval/gain_se`` (accuracy units, 0-1).

    Raises:
        ValueError: ``correct`` and ``start`` differ in length.
    """
    n = len(correct)
    acc = sum(correct) / n
    out = {"eval/accuracy": acc, "eval/accuracy_se": math.sqrt(acc * (1 - acc) / n)}
    if start is not None:
        if len(start) != n:
            raise ValueError(f"held-out evals differ in size ({len(start)} problems at the start, {n} now); "
                             "keep data.eval_size fixed within a run")
        d = [float(a) - float(b) for a, b in zip(correct, start)]
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
        out.update({"eval/gain": mean, "eval/gain_se": math.sqrt(var / n)})
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from ``n`` samples of one problem, ``c`` of them correct: the probability that
    ``k`` samples drawn without replacement from the ``n`` hold at least one correct, ``1 - C(n - c, k) / C(n, k)``
    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1). With ``n == k`` it is 1 if any
    sample is correct, else 0.

    Raises:
        ValueError: not ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n = {n}, c = {c}, k = {k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_k_metrics(counts: list[int], n: int, k: int) -> dict[str, float]:
    """Held-out pass@k over problems sampled ``n`` times each at the rollout temperature, ``counts[i]`` of problem
    ``i``'s samples correct (strict exact match): the mean of `pass_at_k` over problems and its standard error
    ``std / sqrt(m)`` (sample std, ``m - 1``; 0 for one problem), the mean per-sample accuracy ``c / n`` (pass@1
    at the rollout temperature), ``k`` and the problems ``m``. Keys: ``eval/pass@k``, ``eval/pass@k_se``,
    ``eval/sampled_accuracy``, ``eval/pass_k_k``, ``eval/pass_k_problems`` (accuracy units, 0-1). Empty ``counts``:
    no keys.

    Raises:
        ValueError: a count outside ``0..n``, or ``k`` outside ``1..n`` (`pass_at_k`).
    """
    m = len(counts)
    if m == 0:
        return {}
    p = [pass_at_k(n, c, k) for c in counts]
    mean = sum(p) / m
    var = sum((x - mean) ** 2 for x in p) / (m - 1) if m > 1 else 0.0
    return {"eval/pass@k": mean, "eval/pass@k_se": math.sqrt(var / m), "eval/sampled_accuracy": sum(counts) / (m * n),
            "eval/pass_k_k": float(k), "eval/pass_k_problems": float(m)}


def gain_line(accuracy: float, gain: float, gain_se: float | None, n: int) -> str:
    """The line a run ends with: held-out accuracy start -> end, the gain in points and in paired standard
    errors (`held_out_metrics`), e.g. ``held-out accuracy 0.455 -> 0.580: +12.5 points, 3.9 standard errors
    (paired, 200 problems)``. Never prints ``nan``: a standard error of 0 (every paired difference the same,
    e.g. no problem changed) or an undefined one (fewer than 2 problems, not recorded) is said in words.

    Args:
        accuracy: the last held-out accuracy (0-1); gain: its change since the start eval (0-1);
        gain_se: the gain's paired standard error (0-1), None if not recorded; n: held-out problems.
    """
    gain = gain + 0.0  # -0.0 -> 0.0: no "-0.0 points"
    head = f"held-out accuracy {accuracy - gain:.3f} -> {accuracy:.3f}: {100 * gain:+.1f} points"
    problems = f"{n} problem" + ("" if n == 1 else "s")
    if n < 2 or gain_se is None or not math.isfinite(gain_se):
        return f"{head}, standard error undefined (paired, {problems})"
    if gain_se == 0:
        why = "no problem changed" if gain == 0 else "every problem changed the same way"
        return f"{head}, standard error 0: {why} (paired, {problems})"
    return f"{head}, {gain / gain_se:.1f} standard errors (paired, {problems})"


class MetricsLogger:
    """Writes ``metrics.jsonl``, TensorBoard events and ``trained_groups.jsonl`` under ``run_dir``.

    ``keep_steps_upto`` (resume): records after that step are dropped from both JSONL files first,
    and elapsed time continues from the last kept record. TensorBoard keeps the abandoned points; it
    shows the newest value of a step.
    """

    def __init__(self, run_dir: str | Path, keep_steps_upto: int | None = None, wandb_cfg=None,
                 run_config: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kept = []
        if keep_steps_upto is not None:
            kept = truncate_jsonl(self.run_dir / "metrics.jsonl", keep_steps_upto)
            truncate_jsonl(self.run_dir / "trained_groups.jsonl", keep_steps_upto)
        offset = max((r.get("time/elapsed_s") or 0.0 for r in kept), default=0.0)
        self.last: dict = kept[-1] if kept else {}  # the newest record (a resumed run's last kept one)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        self._audit = open(self.run_dir / "trained_groups.jsonl", "a", buffering=1)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        self._t0 = time.time() - offset
        self._wandb = None
        if wandb_cfg is not None and wandb_cfg.wandb_project:
            self._wandb = start_wandb(wandb_cfg, self.run_dir, run_config or {})

    def audit(self, step: int, group_ids: list[str], replayed: list[str] | None = None) -> None:
        """Record which groups (prompt dispatches) step ``step`` trained on (``trained_groups.jsonl``) and, apart
        under ``replayed``, the groups of its self-imitation replays (trained before; no key when there are none),
        so "every dispatched group is trained once" still reads off ``groups``."""
        rec = {"step": step, "groups": group_ids, **({"replayed": replayed} if replayed else {})}
        self._audit.write(json.dumps(rec) + "\n")

    def log(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Record ``metrics`` at ``step``; returns the record written (with step and elapsed time)."""
        rec = {"step": step, "time/elapsed_s": round(time.time() - self._t0, 3)}
        for k, v in metrics.items():
            v = float(v)
            rec[k] = v if math.isfinite(v) else None
            if math.isfinite(v):
                self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps(rec) + "\n")
        self.last = rec
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in rec.items() if k != "step" and v is not None}, step=step)
        return rec

    def flush(self) -> None:
        """Write what is buffered in every file sink to disk."""
        self._jsonl.flush()
        self._audit.flush()
        self._tb.flush()

    def close(self) -> None:
        """Flush and close both sinks."""
        self._jsonl.close()
        self._audit.close()
        self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def start_wandb(cfg, run_dir: Path, run_config: dict):
    """Start (or, on resume, continue) the W&B run of ``run_dir``; files go under ``run_dir/wandb``.

    Raises:
        RuntimeError: ``wandb`` is not installed (names the extra to install).
    """
    try:
        import wandb
    except ImportError:
        raise RuntimeError(f"metrics.wandb_project = {cfg.wandb_project!r} needs the wandb package: "
                           "pip install 'relayrl[wandb]' (or leave metrics.wandb_project unset)") from None
    return wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, mode=cfg.wandb_mode, id=run_dir.name,
                      name=run_dir.name, resume="allow", dir=str(run_dir), config=run_config)
