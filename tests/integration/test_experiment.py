"""`relayrl experiment`: two real variants (subprocess runs on the tiny model) and the table they produce."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_experiment_runs_variants_and_writes_table(tiny_model, tmp_path, monkeypatch):
    spec = tmp_path / "spec.toml"
    spec.write_text(f"""
title = "tiny"
config = "{ROOT / 'deploy/examples/tiny_cpu.toml'}"
overrides = ["model.path={tiny_model}", "num_steps=1", "data.eval_size=8", "data.one_shot=false",
             "rollout.max_tokens=8", "rollout.kv_cache_memory_bytes=67108864", "rollout.max_model_len=256",
             "learner.dtype=fp32", "ray.num_cpus=2"]
columns = [["steps", "summary:step"], ["samples/s", "summary:perf/trained_samples_per_s"],
           ["acc", "curve:eval/accuracy"], ["lag", "max:off_policy/staleness_max"], ["none", "mean:no/such_key"]]
notes = "a note"

[[variants]]
name = "lag 0"
overrides = ["buffer.max_staleness=0"]

[[variants]]
name = "lag 1 (TIS)"
overrides = ["buffer.max_staleness=1", "learner.loss=ppo_tis"]
""")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "docs" / "table.md"
    assert main(["experiment", str(spec), "--out", str(out)]) == 0
    md = out.read_text()
    rows = [line for line in md.splitlines() if line.startswith("| lag")]
    assert len(rows) == 2, md
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "1"  # one step
        assert float(cells[2]) > 0  # trained samples per second
        assert "@0" in cells[3] and "@1" in cells[3]  # accuracy before and after
        assert cells[5] == "-"  # unknown key shown as missing, not as 0
    assert "a note" in md and "relayrl experiment" in md
    raw = json.loads(out.with_suffix(".json").read_text())
    assert set(raw) == {"lag 0", "lag 1 (TIS)"}
    assert all(Path(r["run_dir"], "summary.json").is_file() for r in raw.values())
    # rerunning one row with --only (the others rebuilt from this JSON): tests/unit/test_experiment_table.py


def test_experiment_unknown_variant_is_named(tmp_path, capsys):
    spec = tmp_path / "s.toml"
    spec.write_text('title = "t"\nconfig = "c.toml"\ncolumns = [["a", "summary:x"]]\n'
                    '[[variants]]\nname = "a"\n')
    assert main(["experiment", str(spec), "--only", "b"]) == 2
    assert "unknown variant(s) ['b']" in capsys.readouterr().err
