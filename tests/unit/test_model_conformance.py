"""Conformance matrix: on every decoder family users bring to RL and every learner scoring path, the
learner's response logprobs, entropies and gradients equal an independent reference, or the model is
refused at start with one line naming the feature and what to change.

Reference: one plain forward per sample (``model(input_ids).logits``, no padding, no mask, no positions),
``log_softmax(logits / T)`` at every position, so whatever the model's own forward does after its LM head
(Granite's ``logits_scaling``, Cohere's ``logit_scale``, Gemma's final soft-capping) and whatever its own
masks do (sliding windows) is in it. Tiny random fp32 models built from transformers configs (no download).

Paths (`learner.step.response_logprobs` as `learner.worker` calls it): ``padded`` (a row per sample),
``shared`` (each prompt once, its responses after it, block mask), ``shared_eager`` (the same with eager
attention, whose mask is additive), ``packed`` (token-budget micro-batches from `plan_microbatches`, several
prompts' blocks in one row), ``chunked`` (LM head in chunks of 3 positions, each recomputed in backward),
``lora`` (a PEFT LoRA model, shared prefix, chunked head: the adapters' gradients).

MoE (Qwen3-MoE, OLMoE, gpt-oss, configs with ``output_router_logits = true``): the router's logits and its
load-balancing loss stay out of the RL loss; the router's weights get the policy gradient (checked).

Each architecture's config makes its special feature matter at these lengths: sliding windows of 4 tokens
against sequences of up to 16, post-head scales far from 1, soft-caps close to the logits' size.
"""

from __future__ import annotations

import pytest
import torch

from buffer import Sample
from learner.batching import BatchShape, plan_microbatches
from learner.layout import shared_prefix_layout
from learner.model_support import check
from learner.step import response_logprobs
from tooling.model_matrix import ARCHS, BASE

TEMP = 0.7
ROUTERS = {"qwen3_moe": "model.layers.0.mlp.gate.weight", "olmoe": "model.layers.0.mlp.gate.weight",
           "gpt_oss": "model.layers.0.mlp.router.weight"}
"""MoE architectures -> a router weight, whose gradient the matrix checks too."""
EAGER_ONLY = ("gpt_oss", "gemma2")
"""Architectures that need eager attention, on every path: gpt-oss (attention sinks: transformers has no sdpa
path) and Gemma 2 (attention-score soft-capping, which transformers' sdpa drops: refused with sdpa)."""
REFUSED = {"falcon_h1": ("shared", "shared_eager", "packed", "chunked", "lora")}
"""Paths on which the learner refuses an architecture at start, by design (`learner.model_support.check`)."""
PATHS = {  # name -> (attention implementation, response_logprobs kwargs; pack: token budget per micro-batch)
    "padded": ("sdpa", dict(shared_prefix=False)),
    "shared": ("sdpa", dict(shared_prefix=True)),
    "shared_eager": ("eager", dict(shared_prefix=True)),
    "packed": ("sdpa", dict(shared_prefix=True, pack=34)),
    "chunked": ("sdpa", dict(shared_prefix=True, chunk_tokens=3)),
    "lora": ("sdpa", dict(shared_prefix=True, chunk_tokens=4, lora=True)),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16, 17, 18, 19]]
# (prompt, response length): groups of 3, 2 and 3, an empty response, responses longer than the window
SPEC = [(0, 9), (0, 1), (0, 6), (1, 8), (1, 4), (2, 5), (2, 0), (2, 11)]


def _samples() -> list[Sample]:
    out = []
    for i, (p, r) in enumerate(SPEC):
        resp = [40 + (37 * j + 11 * i) % 250 for j in range(r)]
        out.append(Sample("p", "g", PROMPTS[p], resp, [-1.0] * r, [0] * r))
    return out


def _model(arch: str, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    model_type, over = ARCHS[arch]
    config = CONFIG_MAPPING[model_type](**{**BASE, **over})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()


def _reference(model, samples: list[Sample]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sample ``[R_i]`` logprobs and entropies at ``TEMP``: one sample per forward, no mask, no padding."""
    lps, ents = [], []
    for s in samples:
        logits = model(torch.tensor([s.prompt_ids + s.response_ids])).logits[0].float()
        lp = torch.log_softmax(logits[len(s.prompt_ids) - 1: s.num_tokens - 1] / TEMP, -1)
        lps.append(lp.gather(1, torch.tensor(s.response_ids, dtype=torch.long)[:, None]).squeeze(1))
        ents.append(-(lp.exp() * lp).sum(-1).detach())
    return lps, ents


def _learner(model, samples: list[Sample], pack: int = 0, **kw) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sample logprobs and entropies as the learner computes them: one `response_logprobs` call per
    micro-batch, micro-batches of at most ``pack`` forward tokens (``0``: one micro-batch)."""
    micro = [list(range(len(samples)))]
    if pack:
        groups: dict[tuple[int, ...], list[Sample]] = {}
        for s in samples:  # contiguous by prompt, as in a batch
            groups.setdefault(tuple(s.prompt_ids), []).append(s)
        shape = BatchShape.of(list(groups.values()))
        micro = [mb for mb in plan_microbatches(shape, 1, 1, len(samples), pack, True)[0][0] if mb]
        assert len(micro) > 1, "the token budget must cut the batch into several micro-batches"
        assert any(shared_prefix_layout([samples[i] for i in mb], pack).input_ids.shape[0] == 1
                   and len({tuple(samples[i].prompt_ids) for i in mb}) > 1 for mb in micro), \
            "some micro-batch must pack several prompts into one row"
    lps, ents = [None] * len(samples), [None] * len(samples)
    for mb in micro:
        got, _, ent = response_logprobs(model, [samples[i] for i in mb], "cpu", TEMP, with_entropy=True,
                                        pack_tokens=pack, **kw)
        for j, i in enumerate(mb):
            r = len(samples[i].response_ids)
            assert not got[j, r:].any()
            lps[i], ents[i] = got[j, :r], ent[j, :r]
    return lps, ents


def _grads(model, lps: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients of a loss weighting each token differently (a token scored at the wrong place shows)."""
    model.zero_grad()
    sum((lp * torch.arange(1, len(lp) + 1) * (k + 1)).sum() for k, lp in enumerate(lps)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_learner_logprobs_and_gradients_equal_a_plain_forward(arch, path):
    attn, kw = PATHS[path]
    kw = dict(kw)
    model = _model(arch, "eager" if arch in EAGER_ONLY else attn)
    if kw.pop("lora", False):  # adapters with non-zero B, so that every adapter gets a gradient
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(1)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "qkv_proj"],
                                                 init_lora_weights=False, task_type="CAUSAL_LM"))
    samples = _samples()
    if path in REFUSED.get(arch, ()):
        with pytest.raises(ValueError, match="learner.shared_prefix = false") as err:
            check(model.config, shared_prefix=True)
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="learner.shared_prefix = false"):
            _learner(model, samples, **kw)
        return
    ref, ref_ent = _reference(model, samples)
    g_ref = _grads(model, ref)
    got, ent = _learner(model, samples, **kw)
    for i, s in enumerate(samples):
        assert torch.allclose(got[i], ref[i], rtol=0, atol=1e-5), (i, got[i], ref[i])
        assert torch.allclose(ent[i], ref_ent[i], rtol=0, atol=1e-5), i
    g_got = _grads(model, got)
    assert g_got.keys() == g_ref.keys() and g_ref
    for n in g_ref:
        err = float((g_got[n] - g_ref[n]).norm() / g_ref[n].norm().clamp(min=1e-30))
        assert err < 1e-4, (n, err)
    if path == "lora":
        assert all(".lora_" in n for n in g_got)
    elif arch in ROUTERS:  # MoE: the router is trained through the weights of the experts it picks
        assert ROUTERS[arch] in g_got, sorted(g_got)


def test_moe_router_aux_loss_stays_out_of_the_rl_loss():
    """A MoE config with output_router_logits = true: the learner's forward computes no load-balancing loss
    (it is not part of the RL objective), while the same model's plain forward with labels would add it."""
    model = _model("qwen3_moe")
    s = _samples()[:2]
    seen = []
    model.register_forward_hook(lambda m, a, kw, out: seen.append(out), with_kwargs=True)
    response_logprobs(model, s, "cpu", TEMP)
    assert seen[-1].aux_loss is None and seen[-1].router_logits is None
    ids = torch.tensor([s[0].prompt_ids + s[0].response_ids])
    assert model(ids, labels=ids).aux_loss is not None


def test_the_injected_features_matter():
    """Each special feature of the matrix's configs changes the logprobs far beyond the 1e-5 tolerance, so
    a path that dropped it would fail the matrix: without the window, the post-head scale or the soft-cap,
    the plain forward gives other logprobs."""
    samples = _samples()
    for arch, drop in [("mistral_sliding", dict(sliding_window=None)),
                       ("qwen2_sliding", dict(use_sliding_window=False)),
                       ("gemma2", dict(final_logit_softcapping=None)), ("granite", dict(logits_scaling=1.0)),
                       ("hyperclovax", dict(logits_scaling=1.0)), ("falcon_h1", dict(lm_head_multiplier=1.0)),
                       ("cohere", dict(logit_scale=1.0)), ("gemma3", dict(final_logit_softcapping=None))]:
        model_type, over = ARCHS[arch]
        with torch.no_grad():
            ref, _ = _reference(_model(arch), samples)
            ARCHS[arch] = (model_type, {**over, **drop})
            try:
                other, _ = _reference(_model(arch), samples)
            finally:
                ARCHS[arch] = (model_type, over)
        gap = max(float((a - b).abs().max()) for a, b in zip(ref, other) if len(a))
        assert gap > 1e-3, (arch, gap)


@pytest.mark.parametrize(("model_type", "over", "shared_prefix", "match"), [
    ("falcon_h1", {}, True, r"layer types \['hybrid'\].*learner.shared_prefix = false"),
    ("recurrent_gemma", {}, True, r"non-attention layers \(lru_width\).*learner.shared_prefix = false"),
    ("qwen3_next", {}, True, r"layer types \['linear_attention'\].*learner.shared_prefix = false"),
    ("gemma3_text", dict(use_bidirectional_attention=True), False, "use_bidirectional_attention"),
    ("llama", dict(logit_scale=3.0), False, r"'llama' has logit_scale = 3.0.*learner.model_support"),
    ("gemma2", {}, False, r"attn_logit_softcapping = 50.0.*'sdpa'.*learner.attn_implementation = 'eager'"),
])
def test_unsupported_features_are_refused_in_one_line(model_type, over, shared_prefix, match):
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type](**over)
    with pytest.raises(ValueError, match=match) as err:
        check(config, shared_prefix, "sdpa")
    assert "\n" not in str(err.value)


def test_gemma2_attention_softcapping_is_what_sdpa_drops():
    """Why Gemma 2 needs eager: with attn_logit_softcapping, transformers' sdpa path computes other logits
    than eager (the model as trained, and as vLLM runs it), and the learner refuses sdpa for it."""
    ids = torch.tensor([PROMPTS[0] + [40, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        gap = (_model("gemma2", "eager")(ids).logits - _model("gemma2", "sdpa")(ids).logits).abs().max()
    assert gap > 1e-2
    with pytest.raises(ValueError, match="learner.attn_implementation = 'eager'"):
        response_logprobs(_model("gemma2", "sdpa"), _samples()[:2], "cpu", TEMP)


def test_the_same_models_pass_where_they_are_supported():
    """A state-space hybrid without shared prefix (padded rows), Gemma 2 under eager attention: accepted."""
    from transformers import CONFIG_MAPPING

    check(CONFIG_MAPPING["falcon_h1"](), shared_prefix=False, attn_implementation="sdpa")
    check(CONFIG_MAPPING["gemma2"](), shared_prefix=True, attn_implementation="eager")


def test_the_learner_refuses_such_a_model_at_start(tmp_path):
    """`LearnerWorker.setup` checks the model's config before it joins the process group or loads weights."""
    from transformers import CONFIG_MAPPING

    from learner.config import LearnerConfig
    from learner.worker import LearnerWorker

    CONFIG_MAPPING["falcon_h1"]().save_pretrained(tmp_path)
    worker = LearnerWorker(LearnerConfig(shared_prefix=True), str(tmp_path), 0, 1, 8, 16, 1.0, 0)
    with pytest.raises(ValueError, match="learner.shared_prefix = false"):
        worker.setup("127.0.0.1", 1)
