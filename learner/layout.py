"""How a micro-batch is laid out for one model forward: `padded_layout` (a row per sample) and
`shared_prefix_layout` (each prompt once, its responses after it, under a block attention mask), and
where each scored token's hidden state and target are (`ForwardLayout`). `learner.step.response_logprobs`
runs the forward on a layout.

Left out on purpose: packing of samples that share no prompt, and shared prefixes longer than the prompt
(earlier turns of multi-turn episodes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardLayout:
    """How a micro-batch is laid out for one model forward, and where its scored tokens come from.

    Attributes:
        input_ids: ``[rows, L]`` token ids (right-padded with 0).
        attention_mask: ``[rows, L]`` 1/0 padding mask (padded layout), or ``[rows, L, L]`` bool, True where
            a query position (dim 1) may attend to a key position (dim 2) (shared-prefix layout).
        position_ids: ``[rows, L]`` position of each token in its own sample's sequence.
        src_row, src_pos: ``[N]`` row and position of the hidden state that predicts each scored token.
        targets: ``[N]`` the scored (response) token ids.
        out_row, out_col: ``[N]`` sample index and response column of each scored token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    src_row: torch.Tensor
    src_pos: torch.Tensor
    targets: torch.Tensor
    out_row: torch.Tensor
    out_col: torch.Tensor


def _layout(ids, attn, pos, src_row, src_pos, targets, out_row, out_col) -> ForwardLayout:
    def t(x: list[int]) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long)

    return ForwardLayout(ids, attn, pos, t(src_row), t(src_pos), t(targets), t(out_row), t(out_col))


def _check_prompts(samples: list) -> None:
    for s in samples:
        if not s.prompt_ids and s.response_ids:
            raise ValueError(f"sample {s.prompt_id!r} has an empty prompt: its first response token has no "
                             "position to be predicted from")


def padded_layout(samples: list) -> ForwardLayout:
    """One row per sample, prompt + response, right-padded to the longest sample (``L = max P_i + R_i``).

    Raises:
        ValueError: a sample with a response has an empty prompt.
    """
    _check_prompts(samples)
    L = max(s.num_tokens for s in samples)
    ids = torch.zeros(len(samples), L, dtype=torch.long)
    attn = torch.zeros_like(ids)
    src_row, src_pos, targets, out_col = [], [], [], []
    for i, s in enumerate(samples):
        P, R = len(s.prompt_ids), len(s.response_ids)
        ids[i, : P + R] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attn[i, : P + R] = 1
        src_row += [i] * R
        src_pos += range(P - 1, P - 1 + R)
        targets += s.response_ids
        out_col += range(R)
    pos = torch.arange(L).expand(len(samples), L).clone()
    return _layout(ids, attn, pos, src_row, src_pos, targets, src_row, out_col)


def _prompt_blocks(samples: list) -> dict[tuple[int, ...], list[int]]:
    """Sample indices per distinct prompt, in order of each prompt's first appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.prompt_ids), []).append(i)
    return groups


def _pack_blocks(sizes: list[int], row_tokens: int) -> list[list[int]]:
    """Block indices per row: blocks of ``sizes`` tokens fill a row in order until the next does not fit in
    ``max(row_tokens, largest block)`` tokens, then a new row starts."""
    cap = max(row_tokens, *sizes)
    rows: list[list[int]] = []
    used = 0
    for b, n in enumerate(sizes):
        if rows and used + n <= cap:
            rows[-1].append(b)
            used += n
        else:
            rows.append([b])
            used = n
    return rows


def layout_shape(samples: list, shared_prefix: bool, row_tokens: int = 0) -> tuple[int, int]:
    """``(rows, L)``: the ``input_ids`` shape `shared_prefix_layout` (``shared_prefix``) or `padded_layout` would
    build for ``samples``, computed without building it (no ``[rows, L, L]`` mask)."""
    if not shared_prefix:
        return len(samples), max(s.num_tokens for s in samples)
    sizes = [len(p) + sum(len(samples[i].response_ids) for i in idx) for p, idx in _prompt_blocks(samples).items()]
    rows = _pack_blocks(sizes, row_tokens)
    return len(rows), max(sum(sizes[b] for b in row) for row in rows)


def attention_pair_weight(config) -> float:
    """Forward FLOPs of one (query, key) attention pair relative to one token's dense projections and MLP,
    from a transformers model config: ``4 * heads * head_dim / (2 * (d * (q + 2 kv + o widths) + 3 * d * d_ff))``
    (``q k^T`` and ``p v`` against the q/k/v/o projections and a gated MLP; MoE counts the experts a token
    runs, ``num_experts_per_tok`` x the expert width). Unitless; about 1e-4 for a 0.5B model."""
    d = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    ff = getattr(config, "moe_intermediate_size", None) or getattr(config, "intermediate_size", None) or 4 * d
    ff *= getattr(config, "num_experts_per_tok", None) or 1
    linear = 2 * (d * head_dim * (2 * heads + 2 * kv) + 3 * d * ff)
    return 4 * heads * head_dim / linear


def forward_cost(rows: int, length: int, pair_weight: float) -> float:
    """Estimated forward cost of a ``[rows, length]`` layout, in token-equivalents: ``rows * length`` tokens
    through the dense layers plus ``rows * length**2`` attention pairs at ``pair_weight`` each (a dense 4D or
    padding mask: every pair of a row is computed, masked or not)."""
    return rows * length * (1.0 + pair_weight * length)


def shared_prefix_pays(samples: list, pair_weight: float, row_tokens: int = 0) -> bool:
    """Whether `shared_prefix_layout` is estimated no dearer than `padded_layout` for ``samples`` (`forward_cost`
    of both shapes). Short responses after a long prompt: the prompt encoded once saves more than the block's
    longer rows cost; long responses after a short prompt: one row of all of them costs ``k`` times the
    attention of ``k`` padded rows, and padded rows win."""
    shared = forward_cost(*layout_shape(samples, True, row_tokens), pair_weight)
    return shared <= forward_cost(*layout_shape(samples, False), pair_weight)


def shared_prefix_layout(samples: list, row_tokens: int = 0) -> ForwardLayout:
    """Each distinct prompt once, followed by every response to it (Prefix Grouper, Liu et al. 2025,
    arXiv 2506.05433), such blocks packed into rows of at most ``max(row_tokens, longest block)`` tokens.

    A block is ``prompt (P) | response_1 (R_1) | ... | response_k (R_k)``; blocks fill a row in order
    until the next does not fit, then a new row starts (rows right-padded to the longest). Positions
    restart in each block and after its prompt for each response (prompt ``0..P-1``, response ``i``
    ``P..P+R_i-1``), and the block mask lets a response token attend to its own block's prompt and
    causally to its own response, never to a sibling or another block: each token sees the keys and
    positions it has in its own padded row, so logprobs and gradients are those of `padded_layout`
    while each prompt is encoded once and short blocks share a row instead of padding. Blocks follow each
    prompt's first appearance; scored tokens find their sample through ``out_row`` / ``out_col``. Empty
    responses take no columns.

    Raises:
        ValueError: a sample with a response has an empty prompt.
    """
    _check_prompts(samples)
    groups = _prompt_blocks(samples)
    sizes = [len(p) + sum(len(samples[i].response_ids) for i in idx) for p, idx in groups.items()]
    rows = _pack_blocks(sizes, row_tokens)
    L = max(sum(sizes[b] for b in row) for row in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    pos = torch.zeros_like(ids)
    blk = torch.full_like(ids, -1)  # the block a column belongs to; -1: padding
    part = torch.full_like(ids, -1)  # 0: the block's prompt, k + 1: its k-th response
    src_row, src_pos, targets, out_row, out_col = [], [], [], [], []
    blocks = list(groups.items())
    for r, row in enumerate(rows):
        o = 0
        for b in row:
            prompt, idx = blocks[b]
            P = len(prompt)
            ids[r, o: o + P], pos[r, o: o + P] = torch.tensor(prompt, dtype=torch.long), torch.arange(P)
            blk[r, o: o + P], part[r, o: o + P] = b, 0
            last_prompt, o = o + P - 1, o + P
            for k, i in enumerate(idx):
                resp = samples[i].response_ids
                R = len(resp)
                ids[r, o: o + R] = torch.tensor(resp, dtype=torch.long)
                pos[r, o: o + R] = torch.arange(P, P + R)
                blk[r, o: o + R], part[r, o: o + R] = b, k + 1
                src_row += [r] * R
                src_pos += [last_prompt, *range(o, o + R - 1)][:R]  # the first token is predicted from the prompt's last
                targets += resp
                out_row += [i] * R
                out_col += range(R)
                o += R
    same_block = blk[:, :, None] == blk[:, None, :]
    q, kv = part[:, :, None], part[:, None, :]
    allowed = torch.ones(L, L, dtype=torch.bool).tril() & same_block & ((kv == 0) | (kv == q))
    return _layout(ids, allowed, pos, src_row, src_pos, targets, out_row, out_col)
