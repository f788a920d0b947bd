"""``weights.type = "delta"`` against the full object-store push, on two real rollout workers (vLLM, tiny model,
bf16): worker 0 gets its versions through `DeltaTransport`, worker 1 the same versions through
`ObjectStoreTransport`. After every version worker 0 holds bit-identical weights to the export and both engines
compute bit-identical logprobs, over six versions: full, delta, delta, full to worker 0 after it was replaced (a
new incarnation holding the base model, as after a crash or a hang), delta, full again (``full_every``).

The learner side is a stand-in (no DeepSpeed: its start-up would double this test's time): a plain transformers
model trained by torch AdamW between versions, exported by the learner's own export code
(`learner.weight_export`)."""

from __future__ import annotations

import sys
import time

import pytest

pytestmark = pytest.mark.integration


class _AnyNode:
    """Placement for tests: Ray's default scheduling, nothing reserved."""

    def strategy(self, slot):
        return None

    def release(self, slot):
        pass


class _Learner:
    """`learner.LearnerGroup`'s export side on one in-process model: ``step`` trains it, the export is the real one."""

    def __init__(self, path: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        # lr 1e-5: most bf16 values of a step stay the same, as with a real RL step
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, weight_decay=0.0)

    def step(self) -> None:
        import torch

        ids = torch.randint(5, 60, (2, 24))
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.opt.step()
        self.opt.zero_grad()

    def export_weights_remote(self, dtype: str, bucket_bytes: int):
        import ray

        from learner.weight_export import export_buckets, gathered_named_params

        buckets, metrics = export_buckets(gathered_named_params(self.model, 0, 0), 0, dtype, bucket_bytes)
        self.last = buckets
        return ray.put(buckets), ray.put(metrics)


def _probe_cls():
    from rollout.worker import RolloutWorker

    class DeltaProbe(RolloutWorker):
        def held_digest(self):
            return self._delta_in.digest()

    return DeltaProbe


@pytest.mark.timeout(300)
def test_delta_pushes_serve_bit_identical_weights_to_full_pushes(tiny_model, ray_local):
    import ray

    from base.weight_buckets import iter_buckets
    from base.weight_delta import digest
    from buffer.replay import ReplayBuffer
    from orchestrator.remote import wait_all
    from orchestrator.weights.delta import DeltaTransport, DeltaWeights
    from orchestrator.weights.object_store import ObjectStoreTransport, ObjectStoreWeights
    from rollout.config import DataConfig, RolloutConfig
    from rollout.group import RolloutGroup

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    t0 = time.monotonic()
    buffer_name = f"it-delta-buffer-{time.time_ns()}"
    buffer = ray.remote(ReplayBuffer).options(name=buffer_name, num_cpus=0).remote()
    cfg = RolloutConfig(dtype="bfloat16", kv_cache_memory_bytes=32 << 20, max_model_len=128, max_tokens=8,
                        num_workers=2, num_cpus=0.5)
    group = RolloutGroup(cfg, DataConfig(), tiny_model, buffer_name, _AnyNode(), startup_timeout_s=240,
                         worker_cls=_probe_cls(), wait=False)
    learner = _Learner(tiny_model)
    group.wait_up()
    started = time.monotonic() - t0
    delta = DeltaTransport(DeltaWeights(full_every=4, push_timeout_s=120, bucket_bytes=1 << 20), learner, group,
                           "bfloat16", "it-delta", False)
    full = ObjectStoreTransport(ObjectStoreWeights(push_timeout_s=120), learner, group, "bfloat16", "it-full", False)
    seq, kinds, lps = list(range(5, 45)), [], []
    try:
        for version in range(1, 7):
            if version == 4:  # worker 0 is replaced (as after a crash or a hang): a new incarnation, base model
                assert group.replace(0) == "replaced"
                print(f"worker 0 replaced at {time.monotonic() - t0:.1f} s")
            learner.step()
            members = group.members()
            delta.setup(members[:1]) if members[:1] != delta.members else None
            full.setup(members[1:])
            refs, m = delta.push(version)
            want = dict(iter_buckets(learner.last))
            wait_all(list(refs.values()), 120, "delta push")
            wait_all(list(full.push(version)[0].values()), 120, "full push")
            kinds.append("delta" if m["weights/delta_full_workers"] == 0 else "full")
            if kinds[-1] == "delta":
                assert 0 < m["weights/delta_bytes"] < 0.5 * m["weights/bytes"], m
                assert 0 < m["weights/delta_changed_frac"] < 0.5, m
            w0, w1 = group.slots[0], group.slots[1]
            assert ray.get(w0.held_digest.remote(), timeout=60) == digest(want)  # bit-identical to the export
            assert ray.get(w1.held_digest.remote(), timeout=60) is None  # plain pushes keep no copy
            lp0, lp1 = ray.get([w0.sequence_logprobs.remote(seq, 8, version),
                                w1.sequence_logprobs.remote(seq, 8, version)], timeout=120)
            assert lp0 == lp1, (version, kinds[-1])  # the same bits served: the same floats
            assert not lps or lp0 != lps[-1]  # and the versions differ (the check can fail)
            lps.append(lp0)
    finally:
        for slot in list(group.slots):
            group.release(slot)
        ray.kill(buffer)
    assert kinds == ["full", "delta", "delta", "full", "delta", "full"]
    print(f"workers up in {started:.1f} s, whole test {time.monotonic() - t0:.1f} s")
