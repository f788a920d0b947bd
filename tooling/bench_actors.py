"""Actors `relayrl bench` runs besides the real ones: raw vLLM, SLOWED FAKE rollout workers, idle stand-in
rollout workers, a learner rank that reports its host memory, a tiny model copy.

`RawVLLM` is the baseline of the ``wrapper`` benchmark: the very `vllm.LLM` a `VLLMEngine` builds,
called directly. `FakeRolloutWorker` (``scaling``) is the real `RolloutWorker` (reward scoring,
`Sample` s, buffer writes, weight staging and version waits) around an engine that sleeps a fixed
time per group and answers with synthetic text: generation costs no CPU, so the number of workers,
not the cores, sets the rate. `IdleRolloutWorker` fills the rollout side of a learner-only rig
(``learner_paths``): it starts nothing and is never asked to generate. `MemoryProbeLearner` is the real
`LearnerWorker` plus a read (and reset) of its process's peak resident set (``learner_memory``).

Left out on purpose: any resemblance to vLLM's throughput; benchmarks that report these figures must
label them as fake.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from learner.worker import LearnerWorker
from rollout.rewards import score_response
from tooling.bench_math import proc_status_bytes
from rollout.worker import RolloutWorker

FAKE_GROUP_SECONDS = 6.0  # sleep of a fake engine per group (prompt), seconds; slow enough that 4 fake
# workers stay below what the scaling benchmark's tiny learner trains (at 2 s the learner set the pace)


class RawVLLM:
    """Raw vLLM in a Ray actor: the `vllm.LLM` a `VLLMEngine` builds (same engine arguments), called directly."""

    def __init__(self, rc, data_cfg, model_path: str) -> None:
        import torch

        from rollout.engine import VLLMEngine
        from rollout.engine_args import batch_seqs

        torch.set_num_threads(max(1, int(rc.num_cpus)))  # as RolloutWorker does
        self.rc, self.data_cfg = rc, data_cfg
        self.llm = VLLMEngine(model_path, rc.dtype, rc.kv_cache_memory_bytes, rc.max_model_len, rc.seed,
                              kv_cache_seqs=batch_seqs(data_cfg.eval_size, rc.num_workers, rc.prompts_per_request,
                                                       rc.group_size),
                              gpu_memory_utilization=rc.gpu_memory_utilization, block_size=rc.block_size,
                              tensor_parallel_size=rc.tensor_parallel_size).llm

    def generate(self, problems: list, seed: int) -> int:
        """Encode prompts as `RolloutWorker` does, sample ``group_size`` each; returns tokens generated."""
        from vllm import SamplingParams

        from rollout.tasks import encode_prompt

        rc, d, tok = self.rc, self.data_cfg, self.llm.get_tokenizer()
        prompts = [{"prompt_token_ids": encode_prompt(tok, p.question, d.instruction, d.one_shot)} for p in problems]
        params = SamplingParams(n=rc.group_size, max_tokens=rc.max_tokens, temperature=rc.temperature,
                                top_p=rc.top_p, logprobs=0, seed=seed)
        return sum(len(c.token_ids) for o in self.llm.generate(prompts, params, use_tqdm=False) for c in o.outputs)


class _FakeEngine:
    """SLOWED FAKE engine: sleeps ``FAKE_GROUP_SECONDS`` per prompt, answers ``Answer: <random 0-20>``."""

    def __init__(self, model_path: str, dtype: str, kv_cache_memory_bytes: int, max_model_len: int, seed: int,
                 lora=None, lora_serving="auto", **engine_kwargs) -> None:
        from transformers import AutoTokenizer

        self.tokenizer, self.rng = AutoTokenizer.from_pretrained(model_path), random.Random(seed)

    def generate(self, prompt_token_ids: list, n: int | list[int], max_tokens: int, *args, **kwargs) -> list:
        """``n`` (or ``n[i]`` for prompt ``i``) synthetic completions per prompt, after the sleep."""
        from rollout.engine import Completion

        time.sleep(FAKE_GROUP_SECONDS * len(prompt_token_ids))
        counts = n if isinstance(n, list) else [n] * len(prompt_token_ids)
        texts = [[f"Answer: {self.rng.randint(0, 20)}" for _ in range(k)] for k in counts]
        ids = [[self.tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in g] for g in texts]
        return [[Completion(i, [-1.0] * len(i), t, "stop") for i, t in zip(gi, gt)] for gi, gt in zip(ids, texts)]

    def warm_up(self) -> float:
        """Nothing to warm up (`RolloutWorker` times its engine's first sampling call)."""
        return 0.0

    def load_weights(self, buckets: list[bytes]) -> int:
        return sum(len(b) for b in buckets)


class FakeRolloutWorker(RolloutWorker):
    """A real `RolloutWorker` (rewards, samples, buffer writes, weight staging) around `_FakeEngine`."""

    def __init__(self, cfg, data_cfg, model_path: str, worker_index: int, buffer, lora=None) -> None:
        import rollout.engine as engine

        real, engine.VLLMEngine = engine.VLLMEngine, _FakeEngine  # this actor process only
        try:
            super().__init__(cfg, data_cfg, model_path, worker_index, buffer)
        finally:
            engine.VLLMEngine = real


class IdleRolloutWorker:
    """A stand-in rollout worker for a rig whose rollout side is never used (a learner-only benchmark): no
    engine, no model load; it only answers the start-up probe of `RolloutGroup`. Cheap to start (no vLLM
    import), so a learner-only rig costs a learner start, not a learner plus an engine start."""

    reward_fn = staticmethod(score_response)  # what `RolloutGroup` checks the reward config against; never called

    def __init__(self, cfg, data_cfg, model, worker_index: int, buffer, lora=None) -> None:
        self.version = 0

    def get_version(self) -> int:
        return self.version


class MemoryProbeLearner(LearnerWorker):
    """A real `LearnerWorker` that reports its process's host memory, for per-phase peaks."""

    def host_memory(self, reset_peak: bool = False) -> dict[str, int]:
        """``{"VmHWM", "VmRSS"}`` of this rank's process in bytes (`tooling.bench_math.proc_status_bytes`); with
        ``reset_peak``, then reset the peak to the current resident set (``echo 5 > /proc/self/clear_refs``,
        Linux >= 4.0, proc(5)), so the next reading's peak is that of what ran in between. The reset also lowers
        ``ru_maxrss`` (`LearnerWorker.peak_memory_bytes`) of this process.

        Raises:
            ValueError: no ``/proc/self/status`` memory lines (not Linux).
            OSError: the kernel refused the reset.
        """
        with open("/proc/self/status") as f:
            out = proc_status_bytes(f.read())
        if reset_peak:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return out


def tiny_copy(model_path: str, dest: Path) -> str:
    """A random 2-layer, 64-wide model with ``model_path``'s architecture and tokenizer (Llama-style configs)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_path)
    for key, value in dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=32).items():
        setattr(config, key, value)
    AutoModelForCausalLM.from_config(config).save_pretrained(dest)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(dest)
    return str(dest)
