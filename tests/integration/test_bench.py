"""`relayrl bench`: the wrapper, weight-push and learner-path benchmarks end to end on the tiny config
(real Ray, vLLM, DeepSpeed; the tiny random model stands in for SmolLM2 to keep this to about a minute).

The `lora` benchmark (two more learner + engine rigs, ~1 minute here) is left out of the suite; what it
reports rests on what tests/integration/test_lora.py checks in a real run (adapter-only pushes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.cli import main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(800)
def test_bench_wrapper_weight_push_and_learner_paths_write_table_and_json(tiny_model, tmp_path):
    out = tmp_path / "b.md"
    cmd = [sys.executable, "-m", "orchestrator.cli", "bench", "deploy/examples/tiny_cpu.toml", "--only", "wrapper",
           "--only", "weight_push", "--only", "learner_paths", "--out", str(out),
           f"model.path={tiny_model}", f"output_dir={tmp_path / 'runs'}",
           "learner.dtype=fp32", "rollout.kv_cache_memory_bytes=67108864", "rollout.max_model_len=256",
           "ray.num_cpus=2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=740)
    assert proc.returncode == 0, proc.stderr[-3000:]
    md, raw = out.read_text(), json.loads(out.with_suffix(".json").read_text())
    assert raw["command"].startswith("relayrl bench deploy/examples/tiny_cpu.toml --out ")
    assert f"`{raw['command']}`" in md  # reproducible
    assert "deploy/experiments/time_to_accuracy.toml" in md  # time to accuracy: where it is measured
    rows = {(r["benchmark"], r["metric"]): r for r in raw["rows"]}
    assert {b for b, _ in rows} == {"wrapper", "weight_push", "learner_paths"}
    rates = [r for r in raw["rows"] if r["unit"] in ("tokens/s", "GB/s")]
    assert {r["unit"] for r in rates} == {"tokens/s", "GB/s"} and len(rates) == 7  # 4 of them learner_paths
    for r in rates:
        assert math.isfinite(r["value"]) and r["value"] > 0, r
    assert rows[("weight_push", "model bytes")]["value"] > 0
    overhead = [r for r in raw["rows"] if r["metric"].startswith("overhead")]
    assert len(overhead) == 1 and overhead[0]["target"] == "<= 5" and isinstance(overhead[0]["met"], bool)
    assert math.isfinite(rows[("weight_push", "push / learner step")]["value"])
    # the learner step with one padded row per sample and with shared prefixes, on the same batch: same first loss
    paths = raw["raw"]["learner_paths"]
    assert paths["padded"]["trained_tokens"] == paths["shared prefix"]["trained_tokens"] > 0
    assert paths["packed"]["trained_tokens"] == paths["padded"]["trained_tokens"]
    for k in ("shared prefix", "packed"):
        assert paths[k]["first_step_loss"] == pytest.approx(paths["padded"]["first_step_loss"], abs=1e-5), k
        assert paths[k]["first_step_entropy"] == pytest.approx(paths["padded"]["first_step_entropy"], rel=1e-4), k
    # skipping zero-advantage samples: the same loss (they add 0), their tokens still counted
    skip = paths["zero-advantage skipped"]
    assert skip["trained_tokens"] == paths["padded"]["trained_tokens"]
    assert skip["first_step_loss"] == pytest.approx(paths["padded"]["first_step_loss"], abs=1e-5)
    assert rows[("learner_paths", "zero-advantage skipped: samples skipped")]["value"] == pytest.approx(
        100 * skip["skipped_sample_frac"])
    for k in ("padded", "shared prefix", "packed", "zero-advantage skipped"):
        for metric in ("learner step", "peak learner memory"):
            v = rows[("learner_paths", f"{k}: {metric}")]["value"]
            assert math.isfinite(v) and v > 0
    for r in raw["rows"]:  # the Markdown table holds every JSON row
        assert f"| {r['benchmark']} | {r['metric']} |" in md


def test_bench_unknown_name_lists_the_valid_ones(capsys):
    assert main(["bench", "deploy/examples/tiny_cpu.toml", "--only", "wraper"]) == 2
    err = capsys.readouterr().err
    assert "unknown benchmark(s) ['wraper']" in err and "'weight_push'" in err and "'scaling'" in err
