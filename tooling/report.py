"""`relayrl report RUN`: PNG plots and a one-page Markdown summary of a run dir, local or on a storage URI.

Reads ``metrics.jsonl``, ``config.json`` and (when the run finished) ``summary.json`` through
`base.storage`, so ``RUN`` is a local path or a URI such as ``s3://bucket/runs/<name>-<timestamp>``
(a running job on an object store uploads its metrics at each checkpoint: its report ends there). It
writes, under ``RUN/report/`` (or ``--out``): ``reward_accuracy.png`` (batch reward and held-out accuracy
vs step and vs wall clock), ``staleness.png`` (per-step staleness histogram), ``throughput.png`` (rollout
and learner tokens/s per step), ``weight_push.png`` (export and load seconds per step), ``entropy.png`` (the
policy's mean entropy on trained tokens per step, ``learner/entropy``: a collapse towards 0 can explain a stalled
reward) and ``summary.md``.

Left out on purpose: interactive dashboards (TensorBoard reads the same run dir), Weights & Biases.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from base import storage


def _series(recs: list[dict], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    pts = [(r[x], r[key]) for r in recs if r.get(key) is not None and r.get(x) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(run: str | Path, out: str | None = None) -> list[str]:
    """Render the plots and the summary of the run at ``run`` (a local path or a storage URI) into ``out``
    (a local path or URI; default ``<run>/report``); returns the paths (or URIs) of the files written.

    Raises:
        FileNotFoundError: ``run`` has no ``metrics.jsonl``.
        ValueError: it has no training step recorded yet; `base.storage.StorageError` (a
            ``ValueError``): ``run`` or ``out`` cannot be opened, read or written.
    """
    import matplotlib

    matplotlib.use("Agg")
    run = str(run)
    text = _read(run, "metrics.jsonl")
    if text is None:
        raise FileNotFoundError(f"{run}: no metrics.jsonl there; pass a relayrl run dir or its URI, as printed "
                                "when the run started (<output_dir>/<name>-<timestamp>)")
    recs = [json.loads(x) for x in text.splitlines() if x.strip()]
    steps = [r for r in recs if r.get("step", 0) > 0]
    if not steps:
        raise ValueError(f"{storage.join(run, 'metrics.jsonl')} records no training step yet: report it once "
                         "a step (or, on an object store, a checkpoint) is done")
    out = out or storage.join(run, "report")
    storage.check_writable(out)  # before the plots: a read-only bucket fails here, in one line naming ``out``
    with storage.staged_write(out) as local:
        names = _render(run, recs, steps, Path(local))
    return [storage.join(out, name) if storage.is_remote(out) else os.path.join(local, name) for name in names]


def _read(run: str, name: str) -> str | None:
    """The text of ``<run>/<name>``, or None if there is no such file.

    Raises:
        StorageError: the storage of ``run`` cannot be opened or read (names it and the cause).
    """
    uri = storage.join(run, name)
    try:
        return storage.read_bytes(uri).decode()
    except FileNotFoundError:
        return None
    except Exception as e:  # noqa: BLE001 - each client has its own errors (OSError, botocore's, gcsfs'...)
        raise storage.StorageError(f"storage {uri!r} cannot be read: {type(e).__name__}: "
                                   f"{' '.join(str(e).split())}") from None


def _render(run: str, recs: list[dict], steps: list[dict], out: Path) -> list[str]:
    """Write the plots and ``summary.md`` into the local dir ``out``; returns the file names."""
    import matplotlib.pyplot as plt

    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, x, label in ((axes[0], "step", "step"), (axes[1], "time/elapsed_s", "wall clock (s)")):
        ax.plot(*_series(steps, "rollout/reward_mean", x), marker=".", label="batch reward (T=1)")
        ax.plot(*_series(recs, "eval/accuracy", x), marker="o", label="held-out accuracy (greedy)")
        if any(r.get("eval/pass@k") is not None for r in recs):  # a run that sampled held-out pass@k
            ax.plot(*_series(recs, "eval/pass@k", x), marker="s", label=f"held-out pass@{_pass_k(recs)}")
        ax.set_xlabel(label)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(storage.basename(run))
    written.append(_save(fig, out / "reward_accuracy.png"))

    lags = sorted({int(k.rsplit("_", 1)[1]) for r in steps for k in r if k.startswith("off_policy/staleness_frac_")})
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(steps)
    xs = [r["step"] for r in steps]
    for lag in lags:
        vals = [r.get(f"off_policy/staleness_frac_{lag}") or 0.0 for r in steps]
        ax.bar(xs, vals, bottom=bottom, label=f"lag {lag}")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of trained samples")
    ax.set_title("staleness (policy lag) of trained samples")
    if lags:  # a run that recorded no staleness histogram: no legend to draw
        ax.legend()
    written.append(_save(fig, out / "staleness.png"))

    written.append(_lines(steps, [("perf/rollout_tokens_per_s", "rollout (generated tokens/s)"),
                                  ("perf/learner_tokens_per_s", "learner (trained tokens/s)")],
                          "tokens / s", "throughput", out / "throughput.png"))
    written.append(_lines(steps, [("weights/export_seconds", "export (learner)"),
                                  ("weights/load_seconds", "load (rollout workers)")],
                          "seconds", "weight push", out / "weight_push.png"))
    written.append(_lines(steps, [("learner/entropy", "policy entropy on trained tokens")],
                          "nats per token", "policy entropy", out / "entropy.png"))
    written.append(_summary(run, recs, steps, out / "summary.md"))
    return [p.name for p in written]


def _lines(steps: list[dict], series: list[tuple[str, str]], ylabel: str, title: str, path: Path) -> Path:
    """One line per ``(metric key, label)`` against the step."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in series:
        ax.plot(*_series(steps, key), marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _pass_k(recs: list[dict]) -> str:
    """The k of the run's held-out pass@k (``eval/pass_k_k`` of its last eval that has one), as text."""
    ks = [r["eval/pass_k_k"] for r in recs if r.get("eval/pass_k_k") is not None]
    return f"{ks[-1]:.0f}" if ks else "k"


def _num(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _summary(run: str, recs: list[dict], steps: list[dict], path: Path) -> Path:
    summary, config = (json.loads(_read(run, name) or "{}") for name in ("summary.json", "config.json"))
    evals = [(r["step"], r["eval/accuracy"]) for r in recs if r.get("eval/accuracy") is not None]
    passes = [(r["step"], r["eval/pass@k"], r.get("eval/pass_k_problems") or 0) for r in recs
              if r.get("eval/pass@k") is not None]
    last = steps[-1]

    def mean(key: str) -> str:
        vals = [r[key] for r in steps if r.get(key) is not None]
        return f"{sum(vals) / len(vals):.4g}" if vals else "-"

    lines = [
        f"# {storage.basename(run)}", "", f"- run: {run}", _config_line(config),
        f"- steps: {last['step']} ({'finished' if summary else 'not finished'}), wall clock {last['time/elapsed_s']:.0f} s",
        "- held-out accuracy: " + (", ".join(f"{a:.3f} @ step {s}" for s, a in evals) or "-"),
        *([f"- held-out pass@{_pass_k(recs)} ({passes[0][2]:.0f} problems): "
           + ", ".join(f"{a:.3f} @ step {s}" for s, a, _ in passes)] if passes else []),
        f"- batch reward: first {_num(steps[0].get('rollout/reward_mean'))}, last {_num(last.get('rollout/reward_mean'))}",
        f"- mean step seconds {mean('perf/step_seconds')}, rollout tokens/s {mean('perf/rollout_tokens_per_s')}, "
        f"learner tokens/s {mean('perf/learner_tokens_per_s')}",
        f"- staleness mean {mean('off_policy/staleness_mean')}, mismatch KL {mean('off_policy/mismatch_kl')}, "
        f"dropped samples {sum(r.get('off_policy/dropped_samples') or 0 for r in steps):.0f}",
        f"- weight push: export {mean('weights/export_seconds')} s, load {mean('weights/load_seconds')} s per step",
        _entropy_line(steps),
        "", "![reward and accuracy](reward_accuracy.png)", "![staleness](staleness.png)",
        "![throughput](throughput.png)", "![weight push](weight_push.png)", "![policy entropy](entropy.png)", "",
    ]
    path.write_text("\n".join(line for line in lines if line is not None))
    return path


def _entropy_line(steps: list[dict]) -> str:
    """The policy's entropy on trained tokens (``learner/entropy``, nats per token) at the first and last step
    that recorded it, and its lowest; ``-`` if no step did."""
    xs, ys = _series(steps, "learner/entropy")
    if not xs:
        return "- policy entropy on trained tokens (nats): -"
    low = min(range(len(ys)), key=ys.__getitem__)
    return (f"- policy entropy on trained tokens (nats): first {ys[0]:.3f} @ step {xs[0]}, "
            f"last {ys[-1]:.3f} @ step {xs[-1]}, lowest {ys[low]:.3f} @ step {xs[low]}")


def _config_line(config: dict) -> str | None:
    """The run's shape in one line, from its ``config.json`` (None if it has none)."""
    if not config:
        return None
    ro, lr = config.get("rollout", {}), config.get("learner", {})
    variant = lambda v: v.get("type") if isinstance(v, dict) else v  # noqa: E731 (a table {type = ...} or a name)
    return (f"- config: model {config.get('model', {}).get('path')}, {config.get('num_steps')} steps x "
            f"{config.get('prompts_per_step')} prompts x {ro.get('group_size')} samples, "
            f"{ro.get('num_workers')} rollout worker(s), {lr.get('num_learners')} learner rank(s), "
            f"advantage {variant(lr.get('advantage'))}, loss {variant(lr.get('loss'))}, lr {lr.get('lr')}, "
            f"max staleness {config.get('buffer', {}).get('max_staleness')}")
