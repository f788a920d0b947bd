"""``python -m tooling.gpu_check --out docs/gpu_check.json``: the project's GPU checks in one command, for a
lent GPU machine (budget: under 8 minutes), written to one JSON.

Steps, each in a subprocess with its own timeout (a step that fails, hangs or lacks a package costs that row
only; a row says ``ok``, ``failed`` with the cause, or ``skipped`` with the reason):

- ``device``: CUDA devices, memory, and the versions of torch, vllm, deepspeed and ray;
- ``tests_gpu``: ``pytest tests/gpu`` (the CUDA loop on one GPU, the NCCL weight push on two);
- ``main_job``: a short run of the main job (``deploy/examples/arithmetic_smollm2.toml``) on CUDA, learner
  and rollout engine sharing the GPU;
- ``lora``: the same with LoRA (``deploy/examples/arithmetic_smollm2_lora.toml``): adapters served by vLLM's
  CUDA LoRA kernels;
- ``conformance``: `tooling.engine_conformance` on CUDA attention kernels for the architectures whose
  attention or logits differ most (sliding windows, soft-capping, logit scales).

The main job and LoRA rows carry the run's summary figures (steps, seconds, rollout tokens/s, learner
seconds, weight push seconds, the learner-engine sentinel's gap). ``make gpu-check`` installs the GPU stack
(``make install-gpu``) and runs this; on a machine without CUDA it exits 2 with a one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE_ARCHS = ["llama", "qwen2_sliding", "gemma2", "granite", "cohere"]
SUMMARY_KEYS = ("step", "time/elapsed_s", "perf/rollout_tokens_per_s", "perf/trained_samples_per_s",
                "learner/seconds", "weights/export_seconds", "weights/load_seconds_total", "weights/bytes",
                "sentinel/max_abs_logprob_diff", "sentinel/mismatch_kl", "learner/loss", "rollout/reward_mean")
# one GPU shared: the engine takes a third of the memory, the learner the rest
SHARED_GPU = ["rollout.num_gpus=0.5", "learner.num_gpus=0.5", "rollout.gpu_memory_utilization=0.3",
              "rollout.num_cpus=2", "learner.num_cpus=2"]
DEVICE_PROBE = """
import json, importlib
out = {}
import torch
out["cuda"] = torch.cuda.is_available()
out["devices"] = [{"name": torch.cuda.get_device_name(i),
                   "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1)}
                  for i in range(torch.cuda.device_count())]
for name in ("torch", "vllm", "deepspeed", "ray", "transformers"):
    try:
        out[name] = importlib.import_module(name).__version__
    except Exception as e:  # a missing package is a finding, not a crash
        out[name] = f"missing: {type(e).__name__}"
print(json.dumps(out))
"""


def _run(cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple[int | None, str, float]:
    """``(exit code or None on timeout, last 4000 characters of stdout + stderr, seconds)``."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
                           env={**os.environ, **(env or {})})
        return p.returncode, (p.stdout + p.stderr)[-4000:], time.perf_counter() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out[-4000:], time.perf_counter() - t0


def _last_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def _row(name: str, code: int | None, out: str, seconds: float, timeout_s: float, **extra) -> dict:
    status = "ok" if code == 0 else "failed"
    cause = "" if code == 0 else (f"no result in {timeout_s:.0f} s" if code is None else f"exit {code}: {_last_line(out)}")
    return {"step": name, "status": status, "seconds": round(seconds, 1), **({"error": cause} if cause else {}), **extra}


def _train_row(name: str, config: str, timeout_s: float, work: Path) -> dict:
    out_dir = work / name
    cmd = [sys.executable, "-m", "orchestrator.cli", "train", "-q", config, f"output_dir={out_dir}", "num_steps=4",
           "eval_every=0", "time_budget_s=0", "data.eval_size=0", *SHARED_GPU]
    code, out, seconds = _run(cmd, timeout_s)
    summaries = list(out_dir.glob("*/summary.json"))
    summary = json.loads(summaries[0].read_text()) if summaries else {}
    return _row(name, code, out, seconds, timeout_s, command=" ".join(cmd[2:]),
                summary={k: summary[k] for k in SUMMARY_KEYS if k in summary})


def _tests_row(timeout_s: float, work: Path) -> dict:
    xml = work / "tests_gpu.xml"
    code, out, seconds = _run([sys.executable, "-m", "pytest", "tests/gpu", "-q", "-rs", f"--junitxml={xml}"],
                              timeout_s)
    cases = []
    if xml.is_file():
        import xml.etree.ElementTree as ET

        for case in ET.parse(xml).getroot().iter("testcase"):
            verdict = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            detail = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
            cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "result": verdict,
                          **({"message": detail[:300]} if detail else {})})
    return _row("tests_gpu", code, out, seconds, timeout_s, cases=cases)


def _conformance_row(timeout_s: float, work: Path) -> dict:
    out_json = work / "conformance.json"
    code, out, seconds = _run([sys.executable, "-m", "tooling.engine_conformance", "--device", "cuda",
                               str(out_json), *CONFORMANCE_ARCHS], timeout_s)
    rows = json.loads(out_json.read_text())["rows"] if out_json.is_file() else []
    return _row("conformance", code, out, seconds, timeout_s, rows=rows)


def main(argv: list[str] | None = None) -> int:
    """Run every step; write the JSON to ``--out``; returns 0 when every step ran ``ok`` (skips included),
    1 when one failed, 2 without a CUDA device."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/gpu_check.json", help="the JSON to write")
    ap.add_argument("--only", nargs="*", help="steps to run (default: all)")
    args = ap.parse_args(argv)
    code, out, seconds = _run([sys.executable, "-c", DEVICE_PROBE], 120)
    device = json.loads(_last_line(out)) if code == 0 else {}
    if not device.get("cuda"):
        print(f"gpu_check: no CUDA device here ({_last_line(out) or 'torch reports none'}); run it on a GPU machine "
              "after `make install-gpu`", file=sys.stderr)
        return 2
    rows = [{"step": "device", "status": "ok", "seconds": round(seconds, 1), **device}]
    missing = [p for p in ("vllm", "deepspeed", "ray") if str(device.get(p, "")).startswith("missing")]
    steps = {
        "tests_gpu": lambda w: _tests_row(150, w),
        "main_job": lambda w: _train_row("main_job", "deploy/examples/arithmetic_smollm2.toml", 120, w),
        "lora": lambda w: _train_row("lora", "deploy/examples/arithmetic_smollm2_lora.toml", 90, w),
        "conformance": lambda w: _conformance_row(100, w),
    }
    with tempfile.TemporaryDirectory(prefix="relayrl-gpu-check-") as tmp:
        for name, step in steps.items():
            if args.only and name not in args.only:
                continue
            if missing:
                rows.append({"step": name, "status": "skipped", "reason": f"not installed: {', '.join(missing)} "
                             "(make install-gpu)"})
            else:
                rows.append(step(Path(tmp)))
            print(json.dumps({k: v for k, v in rows[-1].items() if k in ("step", "status", "seconds", "error",
                                                                           "reason")}), flush=True)
    Path(args.out).write_text(json.dumps({"command": "python -m tooling.gpu_check " + " ".join(argv or sys.argv[1:]),
                                          "rows": rows}, indent=2) + "\n")
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
