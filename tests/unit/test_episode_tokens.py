"""Token in, token out: an observation is tokenised once as the chat template's incremental suffix, and
the episode's ids are the sampled ids plus those; re-tokenising the conversation (the naive way) drifts.

Uses the tiny test tokenizer (locally trained BPE, ChatML template) and a template built to re-render
assistant turns differently (trimmed), as chat templates that strip reasoning or whitespace do.
"""

from __future__ import annotations

import pytest

from rollout.episode import TurnEncoder

TRIMMING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{{ m['content'] | trim }}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tiny_model import build_tiny_model
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_tiny_model(tmp_path_factory.mktemp("tok")))


def _piecewise(tok, text: str) -> list[int]:
    """Ids of ``text`` one character at a time: a valid tokenisation a sampler can produce, but not BPE's."""
    return [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]]


def test_observation_suffix_closes_the_turn_once(tok):
    enc = TurnEncoder(tok)
    obs = [{"role": "user", "content": "Tool says 41"}]
    assert enc.turn_close == "<|im_end|>\n"
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.observation_text(obs, stop) == "\n<|im_start|>user\nTool says 41<|im_end|>\n<|im_start|>assistant\n"
    truncated = enc.observation_text(obs, tok("x", add_special_tokens=False)["input_ids"][0])
    assert truncated.startswith("<|im_end|>\n<|im_start|>user\n")


@pytest.mark.parametrize("template", ["chatml", "trimming"])
def test_naive_retokenisation_drifts_and_ours_does_not(tok, template):
    if template == "trimming":
        tok.chat_template = TRIMMING_TEMPLATE
    enc = TurnEncoder(tok)
    opening = [{"role": "user", "content": "Calculate 23 + 18."}]
    turns = ["23 + 18 = 41.  ", "Answer: 41\n"]  # what the model wrote, trailing whitespace included
    observation = [{"role": "user", "content": "Are you sure?"}]
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = enc.prompt_ids(opening)
    sampled = [_piecewise(tok, t) + [stop] for t in turns]  # as a sampler may emit them
    obs_ids = enc.observation_ids(observation, stop)
    ours = prompt + sampled[0] + obs_ids + sampled[1]
    convo = opening + [{"role": "assistant", "content": turns[0]}] + observation + [
        {"role": "assistant", "content": turns[1]}]
    naive = enc.encode(tok.apply_chat_template(convo, tokenize=False))
    assert ours[: len(prompt)] == prompt and ours[len(prompt):] == sampled[0] + obs_ids + sampled[1]
    assert naive != ours  # the naive way trains on ids the policy never sampled
    first_diff = next(i for i, (a, b) in enumerate(zip(naive, ours)) if a != b)
    assert first_diff >= len(prompt)  # the drift starts inside the episode, not in the prompt
    if template == "chatml":  # same text, other ids: pure tokenisation drift ...
        assert tok.decode(ours) == tok.decode(naive)[: len(tok.decode(ours))]
        canonical = prompt + enc.encode(turns[0]) + [stop] + obs_ids + enc.encode(turns[1]) + [stop]
        assert naive[: len(canonical)] == canonical  # ... which vanishes when the sampler happened to be canonical
    else:  # the template rewrote the assistant's words
        assert "41.  " in tok.decode(ours) and "41.  " not in tok.decode(naive)


def test_non_incremental_template_is_refused(tok):
    tok.chat_template = ("{{ messages | length }}{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(ValueError, match="not incremental"):
        TurnEncoder(tok).observation_ids([{"role": "user", "content": "x"}], None)


@pytest.mark.parametrize("one_shot", [False, True])
def test_a_single_turn_episode_opens_with_the_prompt_ids_of_the_data_section(tok, one_shot):
    from buffer import Problem
    from rollout.config import DataConfig
    from rollout.envs import EnvConfig, make_environment
    from rollout.tasks import encode_prompt

    d = DataConfig(one_shot=one_shot)
    env = make_environment(EnvConfig(options={"instruction": d.instruction, "one_shot": one_shot}),
                           Problem("train/0", "Calculate 3 + 4.", "7"))
    assert TurnEncoder(tok).prompt_ids(env.reset(0)) == encode_prompt(tok, "Calculate 3 + 4.", d.instruction, one_shot)
