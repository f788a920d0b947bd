"""Reference check of the policy loss: relayrl's learner against TRL 1.16's `GRPOTrainer` on one batch.

One batch (3 prompts x 4 responses of ragged lengths: fixed token ids, rewards, behaviour logprobs)
and one tiny fp32 Llama (`tests/tiny_model.py`) go through both trainers with the settings the TRL
baseline maps (`tooling.trl_baseline.grpo_config_kwargs`: PPO clip ``[1-clip_low, 1+clip_high]``
= TRL ``epsilon``/``epsilon_high``, ``loss_agg`` token_mean = TRL ``dapo``, constant = ``dr_grpo``,
``beta`` 0, 4 samples per micro-batch = 3 gradient-accumulation steps, sampling temperature 0.7).
Each test asserts the same loss and the same gradient of every parameter (fp32, rtol 1e-5, atol 1e-6).

- relayrl: `LearnerWorker.train_step` (advantages by `learner.advantages.batch_advantages`, the
  normaliser by `learner.off_policy.loss_normalizer`, logprobs by `learner.step.response_logprobs`,
  the loss from `learner.losses.POLICY_LOSSES`) with a stand-in for the DeepSpeed engine that does to
  the gradient what DeepSpeed does (backward of ``loss / gradient_accumulation_steps``) and no
  optimizer step. The clipping test, where pi_prox != pi_theta (a later PPO minibatch), calls the
  same pieces directly.
- TRL: `GRPOTrainer._generate_and_score_completions` with its generator replaced by the fixed batch
  (TRL computes the loss mask, token count, advantages and importance-sampling ratio), then
  `compute_loss` per accumulation step.

Formula sources: trl/trainer/grpo_trainer.py (`_compute_loss`, the advantage and vLLM importance
sampling blocks of `_generate_and_score_completions`) and `nanstd` in trl/trainer/utils.py; Shao et
al. 2024, "DeepSeekMath" (GRPO); Yu et al. 2025, "DAPO" (token-level mean, clip-higher); Liu et al.
2025, "Understanding R1-Zero-Like Training" (Dr. GRPO constant normaliser); Yao et al. 2025 (TIS).

Not covered: several learner ranks, several PPO minibatches (pi_prox recomputed), bf16.

The one setting that is not identical: the GRPO std epsilon, ``A = (r - mean) / (std + eps)`` with
eps 1e-6 in relayrl and 1e-4 in TRL (both std with Bessel's correction). The loss tests therefore
give TRL relayrl's advantages; `test_group_advantages_match_trl` pins the difference.
"""

from __future__ import annotations


import pytest
import torch

from buffer import Sample
from learner.advantages import batch_advantages
from learner.losses import POLICY_LOSSES, PolicyLossInput
from learner.off_policy import loss_normalizer
from learner.step import response_logprobs
from learner.worker import LearnerWorker
from orchestrator.config import RunConfig
from tooling.trl_baseline import grpo_config_kwargs

GROUP, MICRO, MAX_TOKENS, TEMP, TIS_CAP = 4, 4, 6, 0.7, 2.0
REWARDS = [[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.5, 0.0]]  # one zero-variance group
PROMPT_LENS = [5, 3, 7]
RESP_LENS = [6, 2, 5, 1, 3, 6, 4, 2, 6, 6, 1, 3]  # ragged; length 6 = truncated, shorter ones end in EOS
RTOL, ATOL = 1e-5, 1e-6


def _cfg(loss: str = "ppo", agg: str = "token_mean", advantage: str = "grpo", skip: bool = True) -> RunConfig:
    return RunConfig.model_validate({
        "model": {"path": "m"}, "prompts_per_step": len(REWARDS), "num_steps": 1, "seed": 0,
        "buffer": {"max_staleness": 0},
        "rollout": {"group_size": GROUP, "max_tokens": MAX_TOKENS, "temperature": TEMP},
        "learner": {"micro_batch_size": MICRO, "dtype": "fp32", "loss_agg": agg, "advantage": advantage,
                    "loss": {"type": loss, **({"tis_cap": TIS_CAP} if loss == "ppo_tis" else {})}, "torch_threads": 1,
                    "skip_zero_advantage": skip}})


def _model(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.train()


def _batch(path: str, behaviour_shift: float) -> list[list[Sample]]:
    """The fixed batch; behaviour logprobs = the model's own + ``U(-shift, shift)`` per token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(4, len(tok), (n,), generator=g).tolist()  # noqa: E731 (no special tokens)
    groups, lens = [], iter(RESP_LENS)
    for i, (rewards, p) in enumerate(zip(REWARDS, PROMPT_LENS)):
        prompt, group = ids(p), []
        for r in rewards:
            n = next(lens)
            resp = ids(n)[:-1] + [tok.eos_token_id] if n < MAX_TOKENS else ids(n)
            group.append(Sample(prompt_id=f"p{i}", group_id=f"g{i}", prompt_ids=prompt, response_ids=resp,
                                behaviour_logprobs=[0.0] * n, policy_versions=[0] * n, reward=r,
                                status="completed" if n < MAX_TOKENS else "truncated"))
        groups.append(group)
    samples = [s for grp in groups for s in grp]
    with torch.no_grad():
        lp, _ = response_logprobs(_model(path), samples, "cpu", TEMP)
    for i, s in enumerate(samples):
        shift = (torch.rand(len(s.response_ids), generator=g) * 2 - 1) * behaviour_shift
        s.behaviour_logprobs = (lp[i, : len(s.response_ids)] + shift).tolist()
    return groups


class _Engine:
    """What `LearnerWorker.train_step` uses of a DeepSpeed engine. Like DeepSpeed, backward scales the
    loss by ``1 / gradient_accumulation_steps``; ``step`` does nothing: gradients are compared before it."""

    def __init__(self, model, gas: int) -> None:
        self.module, self.gas, self.device, self.skipped_steps = model, gas, torch.device("cpu"), 0

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gas).backward()

    def set_gradient_accumulation_boundary(self, _: bool) -> None: ...
    def step(self) -> None: ...
    def get_global_grad_norm(self) -> float: return 0.0
    def get_lr(self) -> list[float]: return [0.0]


def _relayrl(path: str, cfg: RunConfig, groups: list[list[Sample]], calls: list | None = None
             ) -> tuple[float, dict, dict]:
    """relayrl's learner step on ``groups``: ``(loss, metrics, {name: grad})``; ``calls`` collects the
    batch size of every model forward."""
    worker = LearnerWorker(cfg.learner, path, rank=0, world_size=1, samples_per_step=sum(map(len, groups)),
                           max_tokens=MAX_TOKENS, temperature=TEMP, seed=0)
    model = _model(path)
    if calls is not None:
        model.register_forward_pre_hook(lambda _, args, kw: calls.append(len(kw["input_ids"])), with_kwargs=True)
    worker.engine, worker.ref_model = _Engine(model, worker.gas), None  # what setup() builds (kl_coef 0)
    metrics = worker.train_step(groups, version=0)
    return metrics["learner/loss"], metrics, {n: p.grad for n, p in model.named_parameters()}


def _trl(path: str, cfg: RunConfig, groups: list[list[Sample]], out: str, tis: bool = False,
         advantages: list[float] | None = None, old_logprobs: torch.Tensor | None = None):
    """TRL's step on ``groups``: ``(loss, TRL's generation batch, {name: grad})``.

    ``tis``: TRL's vLLM importance-sampling correction, ``token_truncate`` at ``tis_cap``, with the
    behaviour logprobs as the sampler's. ``advantages`` / ``old_logprobs`` replace TRL's own.
    """
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.trainer.utils import split_tensor_dict

    kw = grpo_config_kwargs(cfg, out, use_cpu=True)
    if tis:
        kw.update(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=TIS_CAP)
    samples = [s for g in groups for s in g]
    rows = [{"prompt": s.prompt_id, "reward": s.reward} for s in samples]

    def reward(prompts, completions, reward, **_):
        return reward

    tok = AutoTokenizer.from_pretrained(path)
    trainer = trl.GRPOTrainer(model=_model(path), reward_funcs=reward, args=trl.GRPOConfig(**kw),
                              train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.use_vllm = tis  # enables the importance-sampling path only: generation is replaced below
    completions = [s.response_ids for s in samples]
    trainer._generate = lambda prompts: (
        [s.prompt_ids for s in samples], completions, None, tok.batch_decode(completions),
        [s.behaviour_logprobs for s in samples] if tis else None, {}, None, [])
    trainer.model.train()
    batch = trainer._generate_and_score_completions(rows)
    if advantages is not None:
        batch["advantages"] = torch.tensor(advantages)
    if old_logprobs is not None:
        batch["old_per_token_logps"] = old_logprobs
    gas = kw["gradient_accumulation_steps"]
    trainer.current_gradient_accumulation_steps = gas  # set by the Trainer's training loop
    loss = 0.0
    for chunk in split_tensor_dict(batch, gas):
        step_loss = trainer.compute_loss(trainer.model, chunk)
        step_loss.backward()
        loss += float(step_loss.detach())
    return loss, batch, {n: p.grad for n, p in trainer.model.named_parameters()}


def _assert_same(loss: float, grads: dict, ref_loss: float, ref_grads: dict) -> None:
    assert loss == pytest.approx(ref_loss, rel=RTOL, abs=ATOL)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-3  # a real gradient, not zeros


def _adv(advantage: str = "grpo") -> list[float]:
    return batch_advantages(advantage, REWARDS)[0]


@pytest.mark.parametrize("agg", ["token_mean", "constant"])
@pytest.mark.parametrize("loss", ["ppo", "ppo_tis"])
def test_on_policy_loss_and_gradient_match_trl(tiny_model, tmp_path, loss, agg):
    """(a, c) behaviour = prox = current logprobs, ragged responses over 3 micro-batches."""
    groups, cfg = _batch(tiny_model, 0.0), _cfg(loss, agg)
    ours, metrics, grads = _relayrl(tiny_model, cfg, groups)
    theirs, _, trl_grads = _trl(tiny_model, cfg, groups, str(tmp_path), advantages=_adv())
    assert metrics["off_policy/is_weight_mean"] == pytest.approx(1.0, abs=1e-6)
    _assert_same(ours, grads, theirs, trl_grads)


@pytest.mark.parametrize("loss, tis", [("ppo_tis", True), ("ppo", False)])
def test_behaviour_mismatch_matches_trl_importance_sampling(tiny_model, tmp_path, loss, tis):
    """(b) behaviour logprobs off by up to 1.5 nats: relayrl's token TIS (cap 2) = TRL's vLLM
    ``token_truncate`` correction (cap 2); relayrl's uncorrected ``ppo`` = TRL without it."""
    groups, cfg = _batch(tiny_model, 1.5), _cfg(loss)
    ours, metrics, grads = _relayrl(tiny_model, cfg, groups)
    theirs, _, trl_grads = _trl(tiny_model, cfg, groups, str(tmp_path), tis=tis, advantages=_adv())
    if tis:
        assert 0.05 < metrics["off_policy/is_truncated_frac"] < 0.95  # the cap binds on some tokens only
    _assert_same(ours, grads, theirs, trl_grads)


@pytest.mark.parametrize("agg", ["token_mean", "constant"])
def test_ppo_clip_with_prox_not_current_matches_trl(tiny_model, tmp_path, agg):
    """(b, c) pi_prox = pi_theta - U(-0.5, 0.5) per token, so ratios leave [0.8, 1.28] on some tokens
    with both signs of advantage: relayrl's PPO clip = TRL's with ``old_per_token_logps`` = pi_prox."""
    groups, cfg = _batch(tiny_model, 0.0), _cfg("ppo", agg)
    samples, adv = [s for g in groups for s in g], _adv()
    model = _model(tiny_model)
    logprobs, mask = response_logprobs(model, samples, "cpu", TEMP)
    g = torch.Generator().manual_seed(1)
    prox = (logprobs.detach() - (torch.rand(logprobs.shape, generator=g) - 0.5)) * mask
    normalizer = loss_normalizer(agg, float(mask.sum()), len(samples), MAX_TOKENS)
    inp = PolicyLossInput(logprobs, prox, prox, torch.tensor(adv), mask, normalizer)
    loss, metrics = POLICY_LOSSES["ppo"](inp, cfg.learner.loss)
    loss.backward()
    assert 0.05 < metrics["learner/pg_clipfrac"] < 0.95
    theirs, _, trl_grads = _trl(tiny_model, cfg, groups, str(tmp_path), advantages=adv, old_logprobs=prox)
    _assert_same(float(loss), {n: p.grad for n, p in model.named_parameters()}, theirs, trl_grads)


@pytest.mark.parametrize("advantage", ["grpo", "drgrpo"])
def test_group_advantages_match_trl(tiny_model, tmp_path, advantage):
    """(d) GRPO (TRL ``scale_rewards="group"``) and Dr. GRPO (``"none"``) advantages. Both divide by the
    std with Bessel's correction; relayrl adds eps 1e-6 to it, TRL 1e-4: a relative difference of
    1e-4 / std (1.7e-4 for rewards [1, 0, 0, 1]), nothing for Dr. GRPO."""
    _, batch, _ = _trl(tiny_model, _cfg(advantage=advantage), _batch(tiny_model, 0.0), str(tmp_path))
    theirs, ours = batch["advantages"], torch.tensor(_adv(advantage))
    r = torch.tensor(REWARDS)
    if advantage == "drgrpo":
        torch.testing.assert_close(ours, theirs, rtol=RTOL, atol=ATOL)
        return
    std = r.std(dim=1, keepdim=True).expand_as(r).flatten()  # Bessel-corrected (1/n would be off by sqrt(4/3))
    torch.testing.assert_close(ours, theirs * (std + 1e-4) / (std + 1e-6), rtol=RTOL, atol=ATOL)
    assert not torch.allclose(ours, theirs, rtol=RTOL, atol=ATOL)  # the eps difference is visible here...
    torch.testing.assert_close(ours, theirs, rtol=3e-4, atol=ATOL)  # ...and small


@pytest.mark.parametrize("loss", ["ppo_tis", "topr"])
def test_skipping_zero_advantage_samples_keeps_loss_and_gradient(tiny_model, loss):
    """``learner.skip_zero_advantage``: the zero-variance group (4 samples, advantage 0) is not run,
    yet loss and gradients equal the step that runs it (its tokens still count in the normaliser)."""
    groups = _batch(tiny_model, 1.0)
    runs = {}
    for skip in (False, True):
        cfg = _cfg(loss, skip=skip)
        calls: list[int] = []
        runs[skip] = (*_relayrl(tiny_model, cfg, groups, calls), calls)
    (full_loss, full_m, full_g, full_calls), (loss_, m, g, calls) = runs[False], runs[True]
    assert full_calls == [1, 1, 1] and calls == [1, 1]  # one packed row per group and micro-batch; group 2 skipped
    assert full_m["learner/skipped_sample_frac"] == 0.0 and m["learner/skipped_sample_frac"] == pytest.approx(1 / 3)
    assert m["learner/tokens"] == full_m["learner/tokens"] == sum(RESP_LENS)
    _assert_same(loss_, g, full_loss, full_g)
