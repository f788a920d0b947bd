"""`relayrl report` on a run whose outputs live on an object store (a real S3-compatible server, moto on
loopback), and its one-line errors for a storage URI without a run.

The run is a real, finished tiny run's dir (`finished_run`) uploaded to a fresh bucket (`s3_finished_run`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from base import storage
from orchestrator.cli import main

FILES = ("reward_accuracy.png", "staleness.png", "throughput.png", "weight_push.png", "entropy.png", "summary.md")


def _check_plots(report_dir: Path) -> None:
    import matplotlib.image

    for name in FILES[:-1]:
        img = matplotlib.image.imread(report_dir / name)
        assert img.shape[0] > 200 and img.shape[1] > 200, name
        assert img[..., :3].std() > 0.01, f"{name} is blank"


def test_report_of_a_run_on_s3_is_written_beside_it_and_matches_the_local_report(s3_finished_run, finished_run,
                                                                                 tmp_path, capsys):
    run = s3_finished_run
    assert main(["report", run]) == 0
    assert capsys.readouterr().out.split() == [storage.join(run, "report", f) for f in FILES]
    with storage.local_copy(storage.join(run, "report")) as d:
        _check_plots(Path(d))
        remote_md = (Path(d) / "summary.md").read_text()

    local_run = tmp_path / finished_run.name  # the same run dir on a local path
    shutil.copytree(finished_run, local_run)
    assert main(["report", str(local_run)]) == 0
    assert capsys.readouterr().out.split() == [str(local_run / "report" / f) for f in FILES]
    local_md = (local_run / "report" / "summary.md").read_text()
    # summary.json and config.json were read from the bucket too: "finished", the config line
    assert "(finished)" in remote_md and "- config: model tiny_model, 3 steps x 4 prompts x 4 samples" in remote_md
    assert "0.000 @ step 3" in remote_md and f"# {finished_run.name}" in remote_md
    assert remote_md.replace(f"- run: {run}", f"- run: {local_run}") == local_md


def test_report_out_writes_a_run_on_s3_to_a_local_dir(s3_finished_run, tmp_path, capsys):
    run = s3_finished_run
    out = tmp_path / "report"
    assert main(["report", run, "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / f) for f in FILES]
    _check_plots(out)
    assert not storage.exists(storage.join(run, "report"))  # nothing written beside the run


def test_report_of_a_uri_without_a_run_is_one_line_naming_it(s3_finished_run, s3_bucket, capsys):
    missing = storage.join(s3_bucket, "runs", "tiny-20260101-000000")
    assert main(["report", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{missing}: no metrics.jsonl there; pass a relayrl run dir or its URI" in err

    no_bucket = f"{s3_bucket}-missing/runs/x"
    assert main(["report", no_bucket]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{no_bucket}: no metrics.jsonl there" in err, err

    no_out = f"{s3_bucket}-missing/report"  # a bucket that does not exist: nothing can be written there
    assert main(["report", s3_finished_run, "--out", no_out]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"storage {no_out!r} is not writable" in err, err

    assert main(["report", "nosuch://bucket/runs/x"]) == 2  # a scheme fsspec does not know
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "storage 'nosuch://bucket/runs/x/metrics.jsonl' cannot be opened" in err


def test_report_has_the_policy_entropy_curve_and_its_summary_line(tmp_path, capsys):
    """A run dir holding only a small ``metrics.jsonl``: the start eval, four steps whose ``learner/entropy``
    falls (one step recorded none: every sample skipped)."""
    import json

    import matplotlib.image

    run = tmp_path / "entropy-20260101-000000"
    run.mkdir()
    recs = [{"step": 0, "time/elapsed_s": 5.0, "eval/accuracy": 0.4}]
    for step, ent in [(1, 1.25), (2, 0.5), (3, None), (4, 0.75)]:
        recs.append({"step": step, "time/elapsed_s": 5.0 + 10 * step, "rollout/reward_mean": 0.1 * step,
                     "learner/entropy": ent})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "report" / f) for f in FILES]
    md = (run / "report" / "summary.md").read_text()
    assert ("- policy entropy on trained tokens (nats): first 1.250 @ step 1, last 0.750 @ step 4, "
            "lowest 0.500 @ step 2") in md.splitlines()
    assert "![policy entropy](entropy.png)" in md
    img = matplotlib.image.imread(run / "report" / "entropy.png")
    assert img[..., :3].std() > 0.01

    for r in recs:  # a run that never recorded the entropy: a dash, not a crash
        r.pop("learner/entropy", None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(run)]) == 0
    assert "- policy entropy on trained tokens (nats): -" in (run / "report" / "summary.md").read_text().splitlines()


def test_report_shows_held_out_pass_at_k_beside_greedy_accuracy(tmp_path, capsys):
    """Evals that sampled held-out pass@k (``eval/pass@k``, ``eval/pass_k_k``): its summary line names k and the
    problems; a run without it has no such line."""
    import json

    run = tmp_path / "passk-20260101-000000"
    run.mkdir()
    recs = [{"step": 0, "time/elapsed_s": 5.0, "eval/accuracy": 0.4, "eval/pass@k": 0.625, "eval/pass_k_k": 8.0,
             "eval/pass_k_problems": 50.0},
            {"step": 1, "time/elapsed_s": 15.0, "rollout/reward_mean": 0.2},
            {"step": 2, "time/elapsed_s": 25.0, "rollout/reward_mean": 0.3, "eval/accuracy": 0.45,
             "eval/pass@k": 0.7, "eval/pass_k_k": 8.0, "eval/pass_k_problems": 50.0}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(run)]) == 0
    capsys.readouterr()
    lines = (run / "report" / "summary.md").read_text().splitlines()
    assert "- held-out pass@8 (50 problems): 0.625 @ step 0, 0.700 @ step 2" in lines

    for r in recs:
        for k in ("eval/pass@k", "eval/pass_k_k", "eval/pass_k_problems"):
            r.pop(k, None)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert main(["report", str(run)]) == 0
    assert not any("pass@" in ln for ln in (run / "report" / "summary.md").read_text().splitlines())
