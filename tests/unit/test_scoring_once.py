"""The model's config is checked once, when a learner rank starts (`learner.model_support.scoring`), and every
forward applies what that check decided: a forward given the setup-time `Scoring` never checks the config
again and scores as a checking one does; the worker's forward passes its own."""

from __future__ import annotations

import pytest
import torch

from buffer import Sample
from learner import model_support
from learner.step import response_logprobs

TEMP = 0.7


def _samples() -> list[Sample]:
    prompt = [5, 6, 7, 8]
    return [Sample("p", "g", prompt, r, [-1.0] * len(r), [0] * len(r)) for r in ([9, 10, 11], [12, 13])]


def _model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def test_scoring_holds_the_transform_and_window_of_the_config():
    from transformers import CONFIG_MAPPING

    plain = model_support.scoring(CONFIG_MAPPING["llama"](), True, "sdpa")
    assert plain == model_support.Scoring(None, None, False)
    gemma = model_support.scoring(CONFIG_MAPPING["gemma3_text"](sliding_window=4, final_logit_softcapping=2.0),
                                  True, "sdpa")
    assert (gemma.window, gemma.mixed) == (4, True)
    assert torch.allclose(gemma.transform(torch.tensor([100.0])), torch.tensor([2.0]))  # tanh(50) * 2
    with pytest.raises(ValueError, match="learner.shared_prefix = false"):
        model_support.scoring(CONFIG_MAPPING["falcon_h1"](), True, "sdpa")


def test_a_forward_with_the_setup_scoring_never_checks_the_config(tiny_model, monkeypatch):
    model, samples = _model(tiny_model), _samples()
    checked = model_support.scoring(model.config, True, "sdpa")
    with torch.no_grad():
        ref, ref_mask = response_logprobs(model, samples, "cpu", TEMP)  # checks the config on this call

    def refuse(*args, **kwargs):
        raise AssertionError("model_support.check ran on a forward")

    monkeypatch.setattr(model_support, "check", refuse)
    with torch.no_grad():
        got, mask = response_logprobs(model, samples, "cpu", TEMP, scoring=checked)
    assert torch.equal(got, ref) and torch.equal(mask, ref_mask) and got[0, :3].lt(0).all()
    with pytest.raises(AssertionError, match="check ran on a forward"):  # without it, the call checks
        response_logprobs(model, samples, "cpu", TEMP)


def test_the_worker_forward_passes_its_setup_scoring(tiny_model, monkeypatch):
    from learner.config import LearnerConfig
    from learner.worker import LearnerWorker

    worker = LearnerWorker(LearnerConfig(), tiny_model, 0, 1, 8, 16, TEMP, 0)
    assert worker.scoring is None  # until setup() checks the model
    model = _model(tiny_model)
    worker.engine, worker.scoring = model, model_support.scoring(model.config, True, "sdpa")
    monkeypatch.setattr(model_support, "check",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("checked on a forward")))
    with torch.no_grad():
        lp, mask = worker._forward(model, _samples())
    assert lp.shape == mask.shape == (2, 3)
