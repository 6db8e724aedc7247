"""Paired significance tests over images: did one model beat another on the same images?

Pure arithmetic on counts and per-image differences, no model knowledge. The GPTQ calibration check
(:mod:`dopq.rounding_check`) decides by :func:`signed_rank_test`; the benchmarks compare models on the
same test images by :func:`sign_test_p` on the images one fixes and breaks (:func:`fixed_broken`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["EXACT_SIGNED_RANK_MAX", "fixed_broken", "paired_sign_test", "sign_test_p", "signed_rank_test"]

# the exact null distribution up to this many non-zero differences (a few ms); the normal
# approximation above
EXACT_SIGNED_RANK_MAX = 400


def fixed_broken(correct: str, base_correct: str) -> tuple[int, int]:
    """Two models' per-image top-1 records on the same images (``"1"`` right, ``"0"`` wrong): the
    images the first gets right and the base gets wrong, and the reverse.

    Example:
        >>> fixed_broken("1100", "1010")
        (1, 1)
    """
    pairs = list(zip(correct, base_correct, strict=True))
    return pairs.count(("1", "0")), pairs.count(("0", "1"))


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test (ties left out): the chance of a split at least this uneven when
    each image is equally likely to go either way."""
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _doubled_ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """Twice the ranks of ``magnitudes`` (1 = smallest), tied values sharing their mean rank, as
    integers: a tie over ranks ``a..b`` gets ``a + b``."""
    order = magnitudes.argsort()
    _, counts = torch.unique_consecutive(magnitudes[order], return_counts=True)
    last = counts.cumsum(0)
    doubled = torch.repeat_interleave(2 * last - counts + 1, counts)
    ranks = torch.empty_like(doubled)
    ranks[order] = doubled
    return ranks


def _signed_rank_null(doubled_ranks: torch.Tensor) -> torch.Tensor:
    """The chance of each (doubled) rank sum ``0..sum`` when every difference is as likely positive
    as negative: each rank joins the sum with probability 1/2."""
    dist = torch.zeros(int(doubled_ranks.sum()) + 1, dtype=torch.float64)
    dist[0] = 1.0
    for r in doubled_ranks.tolist():
        shifted = torch.zeros_like(dist)
        shifted[r:] = dist[:-r]
        dist = 0.5 * (dist + shifted)
    return dist


def paired_sign_test(correct: str, base_correct: str) -> dict[str, int | float] | None:
    """Two models on the same images: the images the first fixes and breaks against the base
    (:func:`fixed_broken`) and the two-sided sign-test p, as ``{"gained", "lost", "p"}``; None where
    the records differ in length (not the same images).

    Example:
        >>> paired_sign_test("1101", "1000")
        {'gained': 2, 'lost': 0, 'p': 0.5}
        >>> paired_sign_test("11", "110") is None
        True
    """
    if len(correct) != len(base_correct):
        return None
    gained, lost = fixed_broken(correct, base_correct)
    return {"gained": gained, "lost": lost, "p": sign_test_p(gained, lost)}


def signed_rank_test(differences: torch.Tensor) -> tuple[float, float]:
    """Two-sided Wilcoxon signed-rank test that paired ``differences`` are centred on 0.

    Zeros are left out and tied magnitudes share their mean rank; the null distribution is exact
    (conditional on the ranks) up to :data:`EXACT_SIGNED_RANK_MAX` non-zero differences, the
    tie-corrected normal approximation with continuity correction above.

    Returns:
        ``(share, p)``: the positive differences' share of the rank sum (0.5 when balanced; 0.5
        with no non-zero difference) and the two-sided p.
    """
    d = differences.detach().double().flatten().cpu()  # one value per image
    d = d[d != 0]
    if d.numel() == 0:
        return 0.5, 1.0
    ranks = _doubled_ranks(d.abs())
    positive, total = int(ranks[d > 0].sum()), int(ranks.sum())
    share = positive / total
    if d.numel() <= EXACT_SIGNED_RANK_MAX:
        null = _signed_rank_null(ranks)
        tail = min(float(null[: positive + 1].sum()), float(null[positive:].sum()))
        return share, min(1.0, 2 * tail)
    sd = math.sqrt(float((ranks.double() ** 2).sum()) / 4)
    z = max(abs(positive - total / 2) - 1, 0.0) / sd  # continuity: half a rank (1 doubled)
    return share, min(1.0, math.erfc(z / math.sqrt(2)))
