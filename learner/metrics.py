"""Learner metrics that say how they combine across ranks, where they are produced.

Each learner rank returns its step's metrics as a `Metrics`: a plain ``{key: value}`` dict to read, which
also holds, for every key, the `Reduce` its producer declared (``Metrics.put(Reduce.SUM, {...})``).
`merge` combines the ranks' metrics into one dict by those declarations alone, with no table of keys, so a
new learner metric is declared in the one place that computes it. `token_quantiles` gives quantiles of a
per-token value over the trained tokens (the policy's entropy by quantile).

Left out on purpose: reductions within a rank (micro-batch metrics are token-weighted by
`learner.step.TokenWeightedMeans` before they become a rank's metrics) and metrics of the other
components (rollout, buffer, weights), which are not produced per learner rank.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TOKENS = "learner/tokens"
"""The key holding a rank's loss tokens in its share of the batch: the weight of `Reduce.TOKEN_MEAN`."""


class Reduce(enum.Enum):
    """How one metric combines across learner ranks (a rank lacking the key counts as 0)."""

    SUM = "sum"
    """Totals that add up over ranks: each rank's share of the loss, token counts."""
    MEAN = "mean"
    """The plain mean over ranks."""
    MAX = "max"
    """The largest over ranks, e.g. wall-clock seconds of a step (the slowest rank)."""
    FIRST = "first"
    """Rank 0's value: a value that is the same on every rank (of the whole batch, or of the optimizer,
    after its collective step), or one only rank 0 produces."""
    TOKEN_MEAN = "token_mean"
    """The mean weighted by each rank's `TOKENS`: for per-token means over a rank's own tokens, so the merged
    value is the per-token mean over all ranks' tokens."""


class Metrics(dict[str, float]):
    """One learner rank's metrics: ``{key: value}`` (read it as a dict) and ``reductions``: ``{key: Reduce}``.

    Keys are ``component/name``. A key set by plain item assignment has no reduction, and `merge` refuses it.
    Pickles (crosses Ray) with its reductions.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reductions: dict[str, Reduce] = {}

    def put(self, how: Reduce, values: Mapping[str, float]) -> Metrics:
        """Set ``values`` (converted to float), each combining across ranks by ``how``; returns self.

        Raises:
            TypeError: ``how`` is not a `Reduce`.
        """
        if not isinstance(how, Reduce):
            raise TypeError(f"Metrics.put needs a learner.metrics.Reduce, got {how!r}")
        for key, value in values.items():
            self[key] = float(value)
            self.reductions[key] = how
        return self

    def extend(self, other: Metrics) -> Metrics:
        """Add ``other``'s values with their reductions (``other`` wins on a shared key); returns self."""
        self.update(other)
        self.reductions.update(other.reductions)
        return self


def merge(per_rank: list[Metrics]) -> dict[str, float]:
    """One dict of the ranks' metrics, each key combined as rank 0's `Metrics` declares it.

    Args:
        per_rank: one `Metrics` per rank, rank 0 first. The keys are rank 0's (a key only other ranks
            report is left out); a rank lacking a key counts as 0 for it. `Reduce.TOKEN_MEAN` weights each
            rank by its ``learner/tokens`` and divides by their sum (at least 1).

    Returns:
        ``{key: value}`` in rank 0's key order.

    Raises:
        ValueError: no ranks, a key without a declared reduction, or ranks that declare a key differently.
        TypeError: a rank's metrics are a plain dict (no reductions).
    """
    if not per_rank:
        raise ValueError("merge needs the metrics of at least one learner rank")
    for rank, m in enumerate(per_rank):
        if not isinstance(m, Metrics):
            raise TypeError(f"learner rank {rank}'s metrics are a {type(m).__name__}, not a learner.metrics.Metrics "
                            "(they carry no cross-rank reductions)")
    tokens = [m.get(TOKENS, 0.0) for m in per_rank]
    total_tokens = max(sum(tokens), 1.0)
    out: dict[str, float] = {}
    for key in per_rank[0]:
        how = per_rank[0].reductions.get(key)
        if how is None:
            raise ValueError(f"learner metric {key!r} declares no cross-rank reduction: produce it with "
                             "Metrics.put(Reduce.<SUM|MEAN|MAX|FIRST|TOKEN_MEAN>, ...)")
        other = {m.reductions[key] for m in per_rank if key in m.reductions} - {how}
        if other:
            raise ValueError(f"learner metric {key!r} is declared {how.value} on rank 0 but "
                             f"{sorted(o.value for o in other)} on another rank")
        vals = [m.get(key, 0.0) for m in per_rank]
        if how is Reduce.SUM:
            out[key] = sum(vals)
        elif how is Reduce.MEAN:
            out[key] = sum(vals) / len(vals)
        elif how is Reduce.MAX:
            out[key] = max(vals)
        elif how is Reduce.FIRST:
            out[key] = vals[0]
        else:
            out[key] = sum(v * t for v, t in zip(vals, tokens)) / total_tokens
    return out


def token_quantiles(values: torch.Tensor, mask: torch.Tensor, name: str,
                    quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> dict[str, float]:
    """Quantiles of ``values`` over the tokens where ``mask`` is 1: ``{f"{name}_p10": ..., ...}`` (no grad).

    Args:
        values, mask: ``[B, T]``; e.g. the policy's entropy (nats) and the loss mask of one micro-batch.
        name: key prefix (``learner/entropy``); quantiles: in ``[0, 1]``, linear interpolation
            (``torch.quantile``'s default, numpy's ``percentile``).

    Returns 0 for each key when no token is masked in. The learner reports them per micro-batch as token means
    (`Reduce.TOKEN_MEAN`), so the merged value is the token-weighted mean of micro-batch quantiles: a cheap
    stand-in for the batch's quantile, exact with one micro-batch.

    Raises:
        ValueError: shapes differ or a quantile is outside ``[0, 1]``.
    """
    import torch

    if values.shape != mask.shape:
        raise ValueError(f"token_quantiles: values {tuple(values.shape)} and mask {tuple(mask.shape)} differ in shape")
    if not all(0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"token_quantiles: quantiles {list(quantiles)} must lie in [0, 1] (0.5: the median)")
    keys = [f"{name}_p{round(q * 100):02d}" for q in quantiles]
    with torch.no_grad():
        v = values.detach()[mask > 0].float()
        if v.numel() == 0:
            return dict.fromkeys(keys, 0.0)
        q = torch.quantile(v, torch.tensor(list(quantiles), dtype=v.dtype, device=v.device))
        return dict(zip(keys, map(float, q)))
