"""The learner's one-forward response logprobs (`learner.step.response_logprobs`) against the plain padded
batch with full-vocabulary logits: the shared-prefix layout (one packed row per prompt, block mask,
restarted positions) and the chunked, response-only LM head must give the same logprobs, entropies and
every parameter's gradient (fp32, tiny model), one model forward per micro-batch."""

from __future__ import annotations

import pytest
import torch

from buffer import Sample
from learner.layout import shared_prefix_layout
from learner.step import response_logprobs

TEMP = 0.7


def _samples(spec: list[tuple[list[int], int]], masks: dict[int, list[int]] | None = None) -> list[Sample]:
    """One sample per ``(prompt_ids, response length)``; ``masks``: loss masks by sample index."""
    out = []
    for i, (prompt, r) in enumerate(spec):
        resp = [40 + (7 * j + 11 * i) % 200 for j in range(r)]
        out.append(Sample("p", "g", prompt, resp, [-1.0] * r, [0] * r, loss_mask=(masks or {}).get(i, [])))
    return out


def _reference(model, samples: list[Sample]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sample ``[R_i]`` logprobs and entropies from one padded row per sample, logits at every position."""
    T = max(s.num_tokens for s in samples)
    ids = torch.zeros(len(samples), T, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, : s.num_tokens], attn[i, : s.num_tokens] = torch.tensor(s.prompt_ids + s.response_ids), 1
    logits = model(input_ids=ids, attention_mask=attn).logits.float() / TEMP
    lps, ents = [], []
    for i, s in enumerate(samples):
        lp = torch.log_softmax(logits[i, len(s.prompt_ids) - 1: s.num_tokens - 1], -1)
        lps.append(lp.gather(1, torch.tensor(s.response_ids, dtype=torch.long)[:, None]).squeeze(1))
        ents.append(-(lp.exp() * lp).sum(-1).detach())
    return lps, ents


def _grads(model, total: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_equivalent(model, samples: list[Sample], **kw) -> None:
    """Logprobs, entropies, loss mask and every gradient of `response_logprobs` equal the reference's."""
    ref, ref_ent = _reference(model, samples)
    # distinct weights per token, so a token scored at the wrong place changes the gradient
    g_ref = _grads(model, sum((lp * torch.arange(1, len(lp) + 1) * (k + 1)).sum() for k, lp in enumerate(ref)))
    got, mask, ent = response_logprobs(model, samples, "cpu", TEMP, with_entropy=True, **kw)
    assert got.shape == mask.shape == ent.shape == (len(samples), max(max(len(s.response_ids) for s in samples), 1))
    for i, s in enumerate(samples):
        r = len(s.response_ids)
        assert torch.allclose(got[i, :r], ref[i], rtol=1e-5, atol=1e-6), i
        assert torch.allclose(ent[i, :r], ref_ent[i], rtol=1e-5, atol=1e-6), i
        assert mask[i].tolist() == [float(m) for m in s.loss_mask] + [0.0] * (mask.shape[1] - r)
        assert not got[i, r:].any()
    g_got = _grads(model, sum((got[i, : len(s.response_ids)] * torch.arange(1, len(s.response_ids) + 1) * (i + 1)).sum()
                              for i, s in enumerate(samples)))
    assert g_got.keys() == g_ref.keys() and g_ref
    for n in g_ref:  # relative to the gradient's norm: summation order differs in the packed row
        err = float((g_got[n] - g_ref[n]).norm() / g_ref[n].norm().clamp(min=1e-30))
        assert err < 1e-5, (n, err)


def _model(path: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn)


P1, P2, P3 = [5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_groups_sharing_prompts_match_the_padded_batch(tiny_model, shared_prefix):
    """(a) two single-turn groups of four samples each, interleaved as rank shards leave them."""
    samples = _samples([(P1, 5), (P2, 4), (P1, 6), (P2, 3), (P1, 2), (P2, 6), (P1, 4), (P2, 1)])
    _assert_equivalent(_model(tiny_model), samples, shared_prefix=shared_prefix)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_tokens", [1024, 4])
def test_ragged_groups_match_the_padded_batch(tiny_model, attn, chunk_tokens):
    """(b) groups of 3, 1 and 2 samples, prompts of 7, 3 and 5 tokens, an empty response, loss masks with
    zeros, the LM head in one chunk or in chunks of 4 positions; sdpa (bool mask) and eager (additive)."""
    samples = _samples([(P1, 4), (P3, 2), (P1, 0), (P2, 6), (P3, 5), (P1, 3)],
                       masks={0: [1, 0, 0, 1], 3: [0, 0, 1, 1, 1, 0], 5: [0, 0, 0]})
    _assert_equivalent(_model(tiny_model, attn), samples, shared_prefix=True, chunk_tokens=chunk_tokens)


def test_groups_packed_into_one_row_match_the_padded_batch(tiny_model):
    """(d) with a token budget, several prompts' blocks share one packed row (each block attends only to
    itself, positions restart per block): still the padded batch's logprobs and gradients."""
    samples = _samples([(P1, 4), (P3, 2), (P1, 0), (P2, 6), (P3, 5), (P1, 3)], masks={3: [0, 1, 1, 1, 1, 0]})
    assert shared_prefix_layout(samples, 64).input_ids.shape[0] == 1
    _assert_equivalent(_model(tiny_model), samples, shared_prefix=True, chunk_tokens=4, pack_tokens=64)


def test_gradient_checkpointing_gives_the_same_logprobs_and_gradients(tiny_model):
    """(e) decoder layers recomputed in backward (learner.gradient_checkpointing), shared prefix and chunked
    head: still the padded batch's logprobs and every gradient."""
    model = _model(tiny_model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    assert model.is_gradient_checkpointing
    samples = _samples([(P1, 4), (P2, 3), (P1, 5), (P2, 0)])
    _assert_equivalent(model, samples, shared_prefix=True, chunk_tokens=4)


def test_a_lora_model_matches_the_padded_batch(tiny_model):
    """(c) a PEFT LoRA model (adapters with non-zero B, so every adapter gets a gradient): the same
    logprobs and adapter gradients; the frozen base weights get none."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(_model(tiny_model), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                          init_lora_weights=False, task_type="CAUSAL_LM"))
    samples = _samples([(P1, 5), (P2, 4), (P1, 0), (P1, 3), (P2, 6)], masks={1: [1, 1, 0, 1]})
    _assert_equivalent(model, samples, shared_prefix=True, chunk_tokens=4)
    got, _ = response_logprobs(model, samples, "cpu", TEMP)
    grads = _grads(model, got.sum())
    assert grads and all(".lora_" in n for n in grads)


def test_one_model_forward_and_one_head_call_per_micro_batch(tiny_model):
    """ZeRO-3 gathers parameters in every module call, collectively: the count must not depend on the
    micro-batch (prompts, lengths, number of chunks)."""
    model = _model(tiny_model)
    calls = {"model": 0, "head": 0}
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("model", calls["model"] + 1))
    model.get_output_embeddings().register_forward_pre_hook(lambda *_: calls.__setitem__("head", calls["head"] + 1))
    for spec in ([(P1, 9)], [(P1, 9), (P2, 7), (P3, 0), (P1, 8)], [(P2, 0)]):
        calls.update(model=0, head=0)
        got, _ = response_logprobs(model, _samples(spec), "cpu", TEMP, chunk_tokens=2)
        got.sum().backward()
        assert calls == {"model": 1, "head": 1}, spec
    assert "forward" not in model.get_output_embeddings().__dict__  # the head's own forward is back


def test_shared_prefix_layout_puts_each_prompt_once_with_restarted_positions():
    samples = _samples([([1, 2, 3], 2), ([4, 5], 1), ([1, 2, 3], 3)])
    lay = shared_prefix_layout(samples)
    assert lay.input_ids.shape == (2, 8)  # rows: 3 + 2 + 3 tokens, 2 + 1 tokens (padded)
    assert lay.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert lay.out_row.tolist() == [0, 0, 2, 2, 2, 1] and lay.out_col.tolist() == [0, 1, 0, 1, 2, 0]
    assert lay.src_pos[:5].tolist() == [2, 3, 2, 5, 6]  # a response's first token comes from the prompt's last
    m = lay.attention_mask[0]
    assert m[5, :3].all() and not m[5, 3:5].any() and m[5, 5]  # the 2nd response sees the prompt, not its sibling
    assert not m[3, 4]  # causal within a response
    packed = shared_prefix_layout(samples, 11)  # both blocks in one row of 8 + 3 tokens
    assert packed.input_ids.shape == (1, 11) and packed.position_ids[0].tolist()[8:] == [0, 1, 2]
    assert packed.src_pos.tolist()[-1] == 9  # the second block's response follows its own prompt's last token
    m = packed.attention_mask[0]
    assert m[10, 8:].all() and not m[10, :8].any() and not m[7, 8:].any()  # blocks never see each other


def test_attention_without_a_custom_mask_is_refused(tiny_model, monkeypatch):
    from learner.config import LearnerConfig

    with pytest.raises(ValueError, match="flash_attention_2"):
        LearnerConfig(attn_implementation="flash_attention_2")
    assert LearnerConfig(attn_implementation="flash_attention_2", shared_prefix=False).shared_prefix is False
    monkeypatch.setattr("learner.step.SHARED_PREFIX_ATTENTION", ("eager",))
    with pytest.raises(ValueError, match="'sdpa'"):
        response_logprobs(_model(tiny_model), _samples([(P1, 2)]), "cpu", TEMP)
    with pytest.raises(ValueError, match="empty prompt"):
        response_logprobs(_model(tiny_model), _samples([([], 2)]), "cpu", TEMP, shared_prefix=False)
