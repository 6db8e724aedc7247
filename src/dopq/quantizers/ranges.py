"""Range statistics shared by the quantizers: exact row-wise quantiles without size limits.

``torch.quantile`` refuses inputs above 2**24 elements (a Swin-Tiny MLP activation of 32 images
is 38M), so quantiles are taken from ``topk`` of the tail they need, which is also faster.
"""

from __future__ import annotations

import math

import torch

__all__ = ["row_quantile", "row_quantiles", "to_rows"]


def to_rows(x: torch.Tensor, channel_axis: int | None) -> torch.Tensor:
    """View ``x`` as ``(channels, samples)``; one row when ``channel_axis`` is None.

    Example: an activation of shape ``(B, N, C)`` with ``channel_axis=-1`` becomes ``(C, B*N)``.
    """
    if channel_axis is None:
        return x.reshape(1, -1)
    return x.movedim(channel_axis, 0).reshape(x.shape[channel_axis], -1)


_LONG_ROW = 1 << 20
_STRIDE = 64


def _topk_sorted(rows: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """``topk`` along rows, sorted (descending for ``largest``, else ascending).

    For one long row a strided sample gives a threshold that about ``2k`` elements pass; the top-k of
    those are the row's top-k whenever at least ``k`` pass (checked; else the plain ``topk``). This
    halves the cost of the tail quantiles of large activations.
    """
    r, m = rows.shape
    if r == 1 and m >= _LONG_ROW and k <= m // (4 * _STRIDE):
        v = rows[0] if largest else -rows[0]
        sample = v[::_STRIDE]
        rank = sample.numel() - (2 * k) // _STRIDE - 8  # 1-based rank of the threshold, ascending
        threshold = torch.kthvalue(sample, max(rank, 1)).values
        candidates = v[v >= threshold]
        if candidates.numel() >= k:
            top = torch.topk(candidates, k, sorted=True).values
            return (top if largest else -top).unsqueeze(0)
    return torch.topk(rows, k, dim=1, largest=largest, sorted=True).values


def row_quantiles(rows: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """Quantiles ``qs`` of each row with linear interpolation (the ``torch.quantile`` default).

    One ``topk`` per tail serves all requested quantiles of that tail.

    Args:
        rows: ``(R, M)`` tensor.
        qs: quantiles in [0, 1].

    Returns:
        ``(len(qs), R)`` tensor.
    """
    m = rows.shape[1]
    positions = [(q, q * (m - 1)) for q in qs]
    upper = [math.floor(p) for q, p in positions if q >= 0.5]
    lower = [math.ceil(p) for q, p in positions if q < 0.5]
    # ascending index j of the top tail is descending index m-1-j
    top = _topk_sorted(rows, m - min(upper), largest=True) if upper else None
    bottom = _topk_sorted(rows, max(lower) + 1, largest=False) if lower else None

    def at(j: int, upper_tail: bool) -> torch.Tensor:
        return top[:, m - 1 - j] if upper_tail else bottom[:, j]

    out = []
    for q, pos in positions:
        lo, hi = math.floor(pos), math.ceil(pos)
        v_lo, v_hi = at(lo, q >= 0.5), at(hi, q >= 0.5)
        out.append(v_lo + (v_hi - v_lo) * (pos - lo))
    return torch.stack(out)


def row_quantile(rows: torch.Tensor, q: float) -> torch.Tensor:
    """Quantile ``q`` of each row, ``(R, M) -> (R,)``; see :func:`row_quantiles`."""
    return row_quantiles(rows, (q,))[0]
