"""Self-imitation replay: the store (`buffer.self_imitation`), its place in the replay buffer's batches (not a
dispatch: kept out of the ledger and the staleness metrics, reported apart), the pure functions of its loss term
(`learner.self_imitation`) against hand-computed values, and a real `LearnerWorker.train_step` whose gradient on a
batch with replays is the term's, computed independently from ``model(input_ids).logits.log_softmax``."""

from __future__ import annotations

import pytest
import torch

from buffer import ReplayBuffer, Sample
from buffer.self_imitation import SelfImitationStore
from learner.self_imitation import self_imitation_loss, sil_advantages
from engine_stand_in import StandInEngine


def _group(prompt: str, gid: str, rewards: list[float], version: int = 0) -> list[Sample]:
    return [Sample(prompt, gid, [1, 2], [3, 4 + i], [-1.0, -1.0], [version, version], reward=r)
            for i, r in enumerate(rewards)]


# ---- pure functions ----------------------------------------------------------------------------------------

def test_sil_advantages_are_the_clipped_positive_part():
    adv = sil_advantages(torch.tensor([1.0, 0.5, 2.0, 1.0]), torch.tensor([0.25, 0.75, 0.0, 1.0]), 1.5)
    assert adv.tolist() == [0.75, 0.0, 1.5, 0.0]  # R - V: 0.75, -0.25 -> 0, 2.0 -> clipped 1.5, 0
    with pytest.raises(ValueError, match="must both be \\[B\\]"):
        sil_advantages(torch.zeros(3), torch.zeros(2), 1.0)
    with pytest.raises(ValueError, match="max_advantage = 0"):
        sil_advantages(torch.zeros(2), torch.zeros(2), 0)


def test_self_imitation_loss_value_gradient_and_metrics_by_hand():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -3.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, m = self_imitation_loss(lp, mask, torch.tensor([0.5, 2.0]), coef=0.1, loss_normalizer=4.0)
    # 0.1 * (0.5 * (1 + 2) + 2.0 * 0.5) / 4
    assert loss.item() == pytest.approx(0.0625) and m["learner/sil_loss"] == pytest.approx(0.0625)
    loss.backward()
    # d/d logp = -coef * A * mask / normaliser: no importance ratio anywhere
    assert torch.allclose(lp.grad, torch.tensor([[-0.0125, -0.0125, 0.0], [-0.05, 0.0, 0.0]]))
    assert m["learner/sil_tokens"] == 3.0 and m["learner/sil_advantage_mean"] == pytest.approx((0.5 * 2 + 2.0) / 3)
    loss0, _ = self_imitation_loss(lp, mask, torch.zeros(2), coef=1.0)  # no advantage: no term
    assert loss0.item() == 0.0
    with pytest.raises(ValueError, match="advantages \\(3,\\) \\[B\\]"):
        self_imitation_loss(lp, mask, torch.zeros(3), coef=1.0)


# ---- the store ---------------------------------------------------------------------------------------------

def test_store_keeps_successes_and_replays_only_those_that_still_beat_their_prompt_value():
    st = SelfImitationStore(capacity=8, fraction=0.5, min_reward=1.0, seed=3)
    a, b = _group("a", "ga", [1.0, 0.0, 0.0, 1.0]), _group("b", "gb", [1.0, 1.0, 1.0, 1.0])
    st.observe([a, b])
    assert (st.value("a"), st.value("b"), st.value("c")) == (0.5, 1.0, None)
    assert st.store([a, b]) == 6  # a's 2 successes and b's 4
    out = st.draw(fresh_samples=8)  # wants 4; only a's two beat their prompt's value (b's 1.0 is not > 1.0)
    assert sorted(s.response_ids for s in out) == [[3, 4], [3, 7]]
    assert all(s.replayed and s.baseline == 0.5 and s.group_id == "ga" for s in out)
    assert not any(s.replayed for s in a)  # copies: the trained originals are untouched
    st.observe([_group("a", "ga2", [1.0, 1.0])])  # the policy now solves a: nothing beats its value any more
    assert st.draw(8) == []
    assert st.metrics(0, 8) == {"buffer/sil_replayed_frac": 0.0, "buffer/sil_replayed_samples": 0.0,
                                "buffer/sil_store_size": 6.0, "buffer/sil_replayed_total": 2.0}


def test_store_evicts_the_oldest_skips_failed_and_resumes_its_draws():
    st = SelfImitationStore(capacity=3, fraction=1.0, min_reward=0.5, seed=0)
    g = _group("a", "g1", [0.5, 0.9, 0.2, 1.0, 0.7])
    g[4].status = "failed"  # a failed reward is never imitated
    st.observe([_group("a", "g0", [0.0, 0.0])])
    assert st.store([g]) == 3 and [s.reward for s in st._samples] == [0.5, 0.9, 1.0]
    st.store([_group("a", "g2", [0.8])])  # capacity 3: the oldest (0.5) goes
    assert [s.reward for s in st._samples] == [0.9, 1.0, 0.8]
    again = SelfImitationStore(capacity=3, fraction=1.0, min_reward=0.5, seed=99)
    again.load_state_dict(st.state_dict())
    assert [s.reward for s in again.draw(2)] == [s.reward for s in st.draw(2)]  # same samples, same RNG
    with pytest.raises(ValueError, match="capacity = 0 must be >= 1"):
        SelfImitationStore(0, 0.5, 1.0)


def test_replay_buffer_batches_carry_replays_after_the_fresh_groups_and_apart_from_the_ledger():
    buf = ReplayBuffer(self_imitation=(16, 0.5, 1.0), seed=0)
    buf.add_groups([_group("a", "g1", [1.0, 0.0]), _group("b", "g2", [0.0, 0.0])])
    first, st1 = buf.take_batch(2, learner_version=0, min_version=0)
    assert [len(g) for g in first] == [2, 2] and st1.replayed_ids == ()  # nothing stored before this batch
    assert st1.metrics["buffer/sil_replayed_frac"] == 0.0 and st1.metrics["buffer/sil_store_size"] == 1.0
    # three steps later: the stored success (version 0) is far past max_staleness, and replays anyway
    buf.add_groups([_group("c", "g3", [0.0, 1.0], version=3), _group("d", "g4", [0.0, 0.0], version=3)])
    batch, st2 = buf.take_batch(2, learner_version=3, min_version=3)
    assert [g[0].group_id for g in batch] == ["g3", "g4", "g1"] and not any(s.replayed for g in batch[:2] for s in g)
    assert batch[2][0].replayed and batch[2][0].baseline == 0.5 and batch[2][0].reward == 1.0
    assert st2.group_ids == ("g3", "g4") and st2.replayed_ids == ("g1",)
    assert buf.ledger()["taken"] == {"g1", "g2", "g3", "g4"}  # each dispatched group taken once
    assert st2.metrics["off_policy/staleness_max"] == 0.0  # the replay's lag of 3 is not a staleness
    assert st2.metrics["buffer/sil_replayed_frac"] == pytest.approx(1 / 5)  # 1 replayed of 5 samples
    resumed = ReplayBuffer(self_imitation=(16, 0.5, 1.0), seed=7)
    resumed.load_state_dict(buf.state_dict())
    assert resumed.sil.state_dict()["samples"] == buf.sil.state_dict()["samples"]


# ---- the learner: a real train_step, its gradient against an independent computation -----------------------

def test_train_step_gradient_on_replays_is_the_self_imitation_term(tiny_model):
    """Fresh groups of equal rewards (zero GRPO advantage, skipped) plus two replays: the whole gradient is
    ``coef * sum -A_i log pi(y_it) / N``, N every trained token of the batch, fresh ones included."""
    from transformers import AutoModelForCausalLM

    from learner.worker import LearnerWorker
    from orchestrator.config import RunConfig

    cfg = RunConfig.model_validate({
        "model": {"path": "m"}, "prompts_per_step": 2, "num_steps": 1, "rollout": {"group_size": 2},
        "buffer": {"max_staleness": 0, "self_imitation": {"fraction": 0.5}},
        "learner": {"micro_batch_size": 2, "dtype": "fp32", "torch_threads": 1,
                    "self_imitation": {"coef": 0.5, "max_advantage": 0.6}}})
    fresh = [[Sample(f"p{g}", f"g{g}", [1, 5 + g], [9, 11 + i], [-2.0, -2.0], [4, 4], reward=1.0) for i in range(2)]
             for g in range(2)]
    replays = [Sample("p7", "g0", [1, 7, 8], [12, 13, 14], [-9.0] * 3, [0] * 3, reward=1.0, replayed=True,
                      baseline=0.25),  # A = 0.75, clipped to 0.6
               Sample("p8", "g1", [1, 6], [15, 16], [-9.0] * 2, [1] * 2, reward=1.0, replayed=True, baseline=0.5)]
    worker = LearnerWorker(cfg.learner, tiny_model, rank=0, world_size=1, samples_per_step=6, max_tokens=4,
                           temperature=1.0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    worker.engine = StandInEngine(model, grad_norm=0.5)
    worker.ref_model = None
    m = worker.train_step(fresh + [[s] for s in replays], version=4)

    ref = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    total = torch.zeros(())
    for s, adv in zip(replays, [0.6, 0.5]):
        ids = torch.tensor([s.prompt_ids + s.response_ids])
        lp = ref(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
        tok_lp = lp[len(s.prompt_ids) - 1:].gather(1, torch.tensor(s.response_ids)[:, None]).squeeze(1)
        total = total - adv * tok_lp.sum()
    n_tokens = 2 * 2 * 2 + 3 + 2  # every trained token of the batch: the loss normaliser
    (0.5 * total / n_tokens).backward()
    got = dict(worker.engine.module.named_parameters())
    # the worker scales its loss by the accumulation steps that DeepSpeed divides by; the stand-in engine does not
    worst = max(((got[k].grad / worker.gas - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-12)).item()
                for k, p in ref.named_parameters() if p.grad is not None)
    assert worst < 1e-4
    assert m["learner/sil_loss"] == pytest.approx(0.5 * total.item() / n_tokens, rel=1e-4)
    assert m["learner/sil_tokens"] == 5.0 and m["learner/samples"] == 4.0  # fresh samples only
    assert m.reductions["learner/sil_loss"].value == "sum"
    assert m["learner/skipped_sample_frac"] == pytest.approx(4 / 6)  # the zero-advantage fresh samples


def test_audit_lists_replays_apart_from_the_trained_groups(tmp_path):
    import json

    from orchestrator.metrics import MetricsLogger

    log = MetricsLogger(tmp_path)
    log.audit(1, ["g1", "g2"])
    log.audit(2, ["g3"], ["g1", "g1"])  # two replays of g1's samples: not a second training of the group
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "trained_groups.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "groups": ["g1", "g2"]}, {"step": 2, "groups": ["g3"], "replayed": ["g1", "g1"]}]


def test_split_replays_gives_fresh_groups_and_sil_advantages_and_refuses_a_replay_first():
    from learner.self_imitation import split_replays

    fresh = [Sample("p1", "g1", [1], [2], [-1.0], [0], reward=0.0),
             Sample("p1", "g1", [1], [3], [-1.0], [0], reward=1.0)]
    replay = Sample("p2", "g2", [1], [4], [-1.0], [0], reward=1.0, replayed=True, baseline=0.25)
    groups, sil = split_replays([fresh, [replay]], max_advantage=0.5)
    assert groups == [fresh] and sil == [0.0, 0.0, 0.5]  # 1.0 - 0.25 clipped to 0.5
    with pytest.raises(ValueError, match="replayed sample before a fresh group"):
        split_replays([[replay], fresh], max_advantage=0.5)
