"""The run-time sentinel in real runs (Ray, vLLM, DeepSpeed, the tiny sums model in fp32): a correct run logs
the learner-engine gap below the bound at every check; a run whose pushed weights are corrupted, and one whose
learner reads the model with a feature the engine does not apply, stop with the sentinel's one line."""

from __future__ import annotations

import json

import pytest
import ray

from learner.worker import LearnerWorker
from orchestrator.loop import Trainer
from orchestrator.sentinel import SentinelError
from rollout.tasks import load_problems
from tiny_run import tiny_run_config

pytestmark = pytest.mark.integration


class CorruptPush(LearnerWorker):
    """Pushes weights with one tensor scaled by 1.5 (a bad weight push: a wrong shard, scale or cast); its own
    weights stay right."""

    def _gathered_named_params(self, adapters_only: bool = False):
        for name, t in super()._gathered_named_params(adapters_only):
            yield name, t * 1.5 if name == "model.layers.0.mlp.down_proj.weight" else t


class LinearRopeLearner(LearnerWorker):
    """Reads the model with linear RoPE scaling (factor 4) that the engine's copy does not have: one side
    applies a model feature the other ignores, as when a config key is read by one library and not the
    other (transformers 5 renamed ``rope_scaling`` to ``rope_parameters``)."""

    def setup(self, master_addr: str, master_port: int) -> int:
        import shutil
        import tempfile
        from pathlib import Path

        copy = Path(tempfile.mkdtemp(prefix="linear-rope-"))
        shutil.copytree(self.model_path, copy, dirs_exist_ok=True)
        config = json.loads((copy / "config.json").read_text())
        config["rope_parameters"] = {**config["rope_parameters"], "rope_type": "linear", "factor": 4.0}
        (copy / "config.json").write_text(json.dumps(config))
        self.model_path = str(copy)
        return super().setup(master_addr, master_port)


def _run(model: str, run_dir, learner_cls=None, *extra: str) -> tuple[Trainer, dict | Exception]:
    cfg = tiny_run_config(model, run_dir.parent, "seed=3", "sentinel.every_steps=1", *extra)
    t = Trainer(cfg, run_dir, model, load_problems(cfg.data, "train"), [], learner_worker_cls=learner_cls)
    try:
        return t, t.run(progress=False)
    except SentinelError as e:
        return t, e
    finally:
        t.shutdown()


def _records(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(600)
def test_sentinel_passes_a_correct_run_and_stops_a_bad_push_and_a_wrong_model(tiny_sums_model, ray_local, tmp_path):
    ray.cloudpickle.register_pickle_by_value(__import__(__name__))
    # a correct async run (max_staleness 1): checks at versions 0 and 1 (version 2 trains on requests admitted
    # before it), each on responses sampled with the learner's weights, far below the bound (fp32: ~1e-6)
    _, summary = _run(tiny_sums_model, tmp_path / "ok")
    assert isinstance(summary, dict), summary
    checked = [r for r in _records(tmp_path / "ok") if "sentinel/mean_abs_logprob_diff" in r]
    assert [r["step"] for r in checked] == [1, 2], checked  # the check before step v+1 is logged with it
    for r in checked:
        assert r["sentinel/tokens"] > 0 and r["sentinel/mean_abs_logprob_diff"] < 1e-3, r
        assert r["sentinel/mismatch_kl"] < 1e-6, r

    # corrupted pushed weights: the check at version 1 (the first pushed weights) stops the run
    t, err = _run(tiny_sums_model, tmp_path / "push", CorruptPush, "buffer.max_staleness=0")
    assert isinstance(err, SentinelError), err
    assert "\n" not in str(err)
    assert str(err).startswith("sentinel: rollout worker 0 at weights version 1: mean |learner - engine logprob| ")
    assert t.version == 1  # stopped before the step it checked was counted (and its weights pushed)

    # a model feature only the learner applies: the check at step 0 stops the run before any push
    t, err = _run(tiny_sums_model, tmp_path / "rope", LinearRopeLearner, "num_steps=2")
    assert isinstance(err, SentinelError), err
    assert str(err).startswith("sentinel: rollout worker 0 at weights version 0: ") and t.version == 0
