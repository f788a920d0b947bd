"""The policy's entropy on trained tokens (`learner.step.token_logprobs`, logged as ``learner/entropy``) against
an independent computation: ``torch.distributions.Categorical`` of the same tempered logits."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("chunk_tokens", [64, 5])  # one chunk; several (checkpointed, the last one short)
def test_entropy_and_logprobs_equal_categoricals_of_the_tempered_logits(chunk_tokens):
    from learner.step import token_logprobs

    torch.manual_seed(0)
    N, H, V, temperature = 23, 16, 50, 0.7
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(N, H, requires_grad=True)
    targets = torch.randint(0, V, (N,))
    cap = lambda x: 3.0 * torch.tanh(x / 3.0)  # noqa: E731 - a logit soft-cap, applied before the temperature

    lp, ent = token_logprobs(head, hidden, targets, temperature, chunk_tokens, transform=cap)
    ref = torch.distributions.Categorical(logits=cap(head(hidden).detach()) / temperature)
    assert lp.shape == ent.shape == (N,)
    assert torch.allclose(ent, ref.entropy(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(lp.detach(), ref.log_prob(targets), rtol=1e-5, atol=1e-6)
    assert not ent.requires_grad and lp.requires_grad  # the entropy is a metric only: no gradient through it
    # a trained-token masked mean, as the learner logs it: masked-out positions do not count
    mask = (torch.arange(N) % 3 != 0).float()
    logged = float((ent * mask).sum() / mask.sum())
    assert logged == pytest.approx(float(ref.entropy()[mask.bool()].mean()), rel=1e-5)
