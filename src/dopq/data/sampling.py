"""Which images a run reads: seeded calibration draws and evenly strided evaluation subsets.

Example:
    >>> strided_indices(10_000, 4)
    [0, 2500, 5000, 7500]
"""

from __future__ import annotations

import torch

from dopq.data.archives import logger
from dopq.errors import DataError

__all__ = ["calibration_indices", "strided_indices"]


def calibration_indices(n_total: int, n: int, seed: int) -> list[int]:
    """Draw ``n`` distinct sample indices reproducibly.

    Args:
        n_total: number of samples in the split.
        n: calibration set size.
        seed: seed of the ``torch.Generator`` passed to ``torch.randperm``.

    Returns:
        The first ``n`` entries of ``torch.randperm(n_total)`` under ``seed``.

    Raises:
        DataError: ``n`` is below 1 or above ``n_total``.

    Example:
        >>> reference = torch.randperm(10, generator=torch.Generator().manual_seed(0))[:3].tolist()
        >>> calibration_indices(10, 3, seed=0) == reference
        True
    """
    if n < 1:
        raise DataError(f"calibration size must be at least 1, got {n}")
    if n > n_total:
        raise DataError(f"calibration size {n} exceeds the {n_total} images of the split; use at most that")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=generator)[:n].tolist()


def strided_indices(n_total: int, n: int | None) -> list[int]:
    """Pick ``n`` evenly strided indices (all of them when ``n`` is None or at least ``n_total``).

    Args:
        n_total: number of samples in the split.
        n: subset size or None.

    Returns:
        ``[i * n_total // n for i in range(n)]``.

    Raises:
        DataError: ``n`` is below 1.

    Example:
        >>> strided_indices(10, 3)
        [0, 3, 6]
    """
    if n is not None and n < 1:
        raise DataError(f"subset size must be at least 1, got {n}")
    if n is not None and n > n_total:
        logger.warning(
            "a subset of %d images was asked of a split of %d: all %d are used", n, n_total, n_total
        )
    if n is None or n >= n_total:
        return list(range(n_total))
    return [i * n_total // n for i in range(n)]
