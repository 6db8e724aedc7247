"""Non-uniform quantizers defined by a table of levels (post-Softmax quantizers).

Every quantizer here maps ``x`` to an integer code by comparing it with ascending thresholds and
dequantizes by a lookup table, ``x_hat = levels[code]``: the integer-friendly form and the
simulated quantizer are the same computation, so they agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dopq.quantizers.base import Quantizer, register_quantizer
from dopq.quantizers.ranges import row_quantiles
from dopq.quantizers.uniform import DEFAULT_PERCENTILES

__all__ = [
    "LevelQuantizer",
    "Log2Quantizer",
    "LogQuantizer",
    "LogSqrt2Quantizer",
    "attention_error",
    "codes_from_thresholds",
    "float32_decision_points",
    "grid_cell_codes",
    "grid_cells",
    "log_levels",
    "snap_thresholds",
    "snapped_in",
]


def lookup(table: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``table[codes]`` for a 1-D table; ``index_select`` is ~5x faster than advanced indexing
    on CPU for the millions of codes of an attention map."""
    return table.index_select(0, codes.reshape(-1)).view(codes.shape)


def _with_ste(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``values`` in the forward pass, the identity's gradient to ``x`` (skipped without autograd)."""
    if torch.is_grad_enabled() and x.requires_grad and not torch.jit.is_tracing():  # as fake_quantize_uniform
        return values + (x - x.detach())
    return values


def codes_from_thresholds(x: torch.Tensor, thresholds: torch.Tensor, out_int32: bool = False) -> torch.Tensor:
    """Integer code of each element: the number of thresholds strictly below it."""
    return torch.bucketize(x, thresholds, out_int32=out_int32)


def snap_thresholds(levels: torch.Tensor, thresholds: torch.Tensor, grid_bits: int) -> torch.Tensor | None:
    """Thresholds moved onto the grid ``g = j / 2^grid_bits`` of ``[0, 1]``, or None where that grid
    is too coarse for the table.

    Each threshold ``t_k`` becomes the float32 just below its nearest grid point ``g_k``, so that
    ``x > t'_k`` exactly when ``x >= g_k``: the code of ``x`` is then fixed by its grid cell
    ``floor(x * 2^grid_bits)``, one table read (:func:`grid_cell_codes`; the deployed form,
    docs/export.md). Snapping moves a threshold by at most ``2^-(grid_bits + 1)``; it is refused
    (None) where a threshold would leave the middle half of its two levels' interval or pass 1.
    """
    scale = float(2**grid_bits)
    lv, th = levels.detach().double(), thresholds.detach().double()
    grid = torch.round(th * scale) / scale
    gap = lv[1:] - lv[:-1]
    inside = (grid > lv[:-1] + gap / 4) & (grid < lv[1:] - gap / 4)
    if not bool(inside.all()) or float(grid.max()) > 1.0:
        return None
    snapped = torch.nextafter(grid.float(), torch.zeros((), dtype=torch.float32))
    return snapped.to(thresholds.dtype)


def snapped_in(thresholds: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Snapped thresholds (:func:`snap_thresholds`) in ``dtype``: the largest ``dtype`` value below
    each grid point ``g``, so that ``x > t`` still means ``x >= g`` in that precision. (The float32
    just below ``g`` cast to float64 would leave the float64 values between it and ``g`` on the other
    side of the threshold than their grid cell puts them.)"""
    grid = torch.nextafter(thresholds, torch.tensor(float("inf"), dtype=thresholds.dtype)).to(dtype)
    return torch.nextafter(grid, torch.tensor(float("-inf"), dtype=dtype))


def grid_cells(x: torch.Tensor, grid_bits: int) -> torch.Tensor:
    """``floor(x * 2^grid_bits)`` of ``x`` clipped to ``[0, 1]`` (int64): the grid cell of each
    element. Multiplying by a power of two is exact, so every runtime finds the same cell."""
    return (x.clamp(0.0, 1.0) * float(2**grid_bits)).long()


def grid_cell_codes(thresholds: torch.Tensor, grid_bits: int) -> torch.Tensor | None:
    """The code of every grid cell ``0 .. 2^grid_bits`` (int64), or None when some threshold is
    not a snapped one (:func:`snapped_in`: the value just below a grid point in the thresholds'
    dtype), so that the cell does not fix the code."""
    scale = float(2**grid_bits)
    th = thresholds.detach().cpu()
    above = torch.nextafter(th, torch.tensor(float("inf"), dtype=th.dtype)).double() * scale
    if not bool((above == torch.round(above)).all()) or float(above.max()) > scale:
        return None
    points = torch.arange(2**grid_bits + 1, dtype=torch.float64) / scale
    return codes_from_thresholds(points.to(th.dtype), th)


def float32_decision_points(
    codes: Callable[[torch.Tensor], torch.Tensor], n_codes: int, top: float
) -> torch.Tensor:
    """The float32 points where a monotone code function steps: ``t`` with ``codes(x) ==
    #{k : x > t_k}`` for every float32 ``x`` in ``[0, top]``.

    ``t_k`` is the largest float32 whose code is below ``k`` (``k = 1..n_codes - 1``), found by
    bisection over the bit patterns of non-negative floats, which order them as their values do.
    A code function that is not monotone, or whose top code is not reached by ``top``, raises
    ``ValueError``: no threshold count could reproduce it.
    """
    wanted = torch.arange(1, n_codes, dtype=torch.int64)
    lo = torch.zeros_like(wanted)  # bit pattern of 0.0: code 0 < k
    hi = torch.full_like(wanted, int(torch.tensor(top, dtype=torch.float32).view(torch.int32)))

    def code_of(bits: torch.Tensor) -> torch.Tensor:
        return codes(bits.to(torch.int32).view(torch.float32)).long()

    if int(code_of(lo[:1])) != 0 or int(code_of(hi[:1])) != n_codes - 1:
        raise ValueError(f"codes must run from 0 at 0.0 to {n_codes - 1} at {top:g}")
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        below = code_of(mid) < wanted
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    thresholds = lo.to(torch.int32).view(torch.float32)
    _check_threshold_count(codes, thresholds, top)
    return thresholds


def _check_threshold_count(
    codes: Callable[[torch.Tensor], torch.Tensor], thresholds: torch.Tensor, top: float
) -> None:
    """The threshold count must give the code function's own codes at every threshold, the floats
    either side of it and a dense grid in between; otherwise the code function is not monotone."""
    above = torch.nextafter(thresholds, torch.tensor(float("inf")))
    below = torch.nextafter(thresholds, torch.tensor(0.0))
    grid = torch.linspace(0, top, 1 << 16, dtype=torch.float32)
    x = torch.cat([thresholds, above, below, grid])
    if not torch.equal(codes(x).long(), codes_from_thresholds(x, thresholds)):
        raise ValueError("the code function is not monotone: no threshold count reproduces it")


def log_levels(
    delta: torch.Tensor, bits: int, step: float, extra_zero: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Levels ``delta * 2^(-k*step)`` plus an exact zero, rounded in the log domain.

    Args:
        delta: the largest level.
        bits: bit width; ``2^bits`` non-zero levels when ``extra_zero`` (RepQ-ViT's log-sqrt2,
            where codes past the last level become an extra exact 0), else ``2^bits - 1`` non-zero
            levels and zero, which fits in ``bits``.
        step: 1 for log2, 0.5 for log-sqrt2.

    Returns:
        ``(levels, thresholds)`` ascending; thresholds sit where ``round(-log2(x/delta)/step)``
        changes, so the table reproduces the usual log-domain rounding.
    """
    n_nonzero = 2**bits if extra_zero else 2**bits - 1
    k = torch.arange(n_nonzero - 1, -1, -1, dtype=delta.dtype, device=delta.device)
    nonzero = delta * torch.pow(2.0, -k * step)
    zero = torch.zeros(1, dtype=delta.dtype, device=delta.device)
    levels = torch.cat([zero, nonzero])
    # boundary between codes k and k-1 is at exponent k - 1/2, the zero boundary past the last code
    kb = torch.arange(n_nonzero - 1, -1, -1, dtype=delta.dtype, device=delta.device) + 0.5
    thresholds = delta * torch.pow(2.0, -kb * step)
    return levels, thresholds


def attention_error(x: torch.Tensor, x_hat: torch.Tensor, values: torch.Tensor | None) -> torch.Tensor:
    """Squared error of ``x_hat`` (mean), or of ``x_hat @ values`` when values are given.

    Shapes: ``x``/``x_hat`` ``(..., R, N)`` and ``values`` ``(R, N, D)`` pair each row with its V.
    """
    diff = x_hat - x
    if values is None:
        return diff.pow(2).mean(dim=(-2, -1))
    return torch.einsum("...rn,rnd->...rd", diff, values).pow(2).mean(dim=(-2, -1))


class LevelQuantizer(Quantizer):
    """Quantizer given by ascending ``levels`` and ``thresholds`` (``len(levels) - 1`` of them).

    ``grid_bits`` (families that support it, TanQ): thresholds snapped onto the ``2^-grid_bits``
    grid of ``[0, 1]`` (:func:`snap_thresholds`), so that a code is one table read per element
    (:meth:`code_grid`), in the simulation and in the exported graph alike.
    """

    grid_bits: int | None = None

    def level_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes (int64) indexing :meth:`lookup_table`."""
        return self.code_index(x.detach(), self.level_table()[1].detach()).long()

    def code_index(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """The codes of ``x`` (int32 or int64) for ascending ``thresholds``: the one rule behind
        :meth:`codes` and fake quantization. On a GPU a binary search over the thresholds is one
        pass; on a CPU a family's closed form (:meth:`closed_form_codes`) is several times faster.
        Both give the number of thresholds strictly below each element (``tests/test_quantizers.py``).
        With thresholds on a grid (:meth:`code_grid`) the element's grid cell gives the same code,
        on every device, in one table read.
        """
        grid = self.code_grid()
        if grid is not None:
            return lookup(grid[1], grid_cells(x, grid[0]))
        if x.is_cuda:
            return codes_from_thresholds(x, thresholds, out_int32=True)
        return self.closed_form_codes(x, thresholds)

    def closed_form_codes(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        """Codes by the family's own formula; the plain threshold count where it has none."""
        return codes_from_thresholds(x, thresholds)

    def lookup_table(self) -> torch.Tensor:
        """Dequantized value of every code."""
        return self.level_table()[0].detach()

    def code_grid(self) -> tuple[int, torch.Tensor] | None:
        """``(grid_bits, code of every grid cell)`` when the thresholds sit on the grid (the code of
        ``x`` in ``[0, 1]`` is ``cells[floor(x * 2^grid_bits)]``), else None."""
        if self.grid_bits is None:
            return None
        thresholds = self.level_table()[1]
        return self.remembered("grid", lambda: self._code_grid(thresholds))

    @torch.compiler.disable  # data-dependent checks (grid_cell_codes): compiled, a warned graph break
    def _code_grid(self, thresholds: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        cells = grid_cell_codes(thresholds, self.grid_bits)
        return None if cells is None else (self.grid_bits, cells.to(thresholds.device))

    def decision_points(self) -> torch.Tensor:
        """float32 thresholds whose count is exactly :meth:`codes` for every float32 input in
        ``[0, 4 * max level]`` (above it the top code): the exported code rule. They equal the
        table's thresholds where the codes come from them (TanQ), and are where the log-domain
        rounding really steps for the log quantizers (one float step from the table's at most)."""
        top = 4.0 * float(self.lookup_table().float().max()) + 1.0
        table = self.lookup_table()
        return float32_decision_points(lambda x: self.codes(x.to(table)), len(table), top)

    def resolve(self) -> LevelQuantizer:
        """The quantizer that defines the levels: itself, or the family a chooser picked."""
        return self

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        levels, thresholds = self.level_table()
        code = self.code_index(x.detach(), thresholds.detach())
        return _with_ste(lookup(levels.detach(), code), x)


class LogQuantizer(LevelQuantizer):
    """Log-domain levels ``delta * 2^(-e*step)`` plus an exact zero; codes by log-domain rounding."""

    step: float
    extra_zero: bool

    @property
    def n_nonzero(self) -> int:
        """Number of non-zero levels ``delta * 2^(-e*step)``, ``e = 0..n_nonzero-1``."""
        return self._n_nonzero

    @property
    def _n_nonzero(self) -> int:
        return 2**self.bits if self.extra_zero else 2**self.bits - 1

    def _exponents(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Rounded level exponents ``e`` (level ``delta * 2^(-e*step)``); ``e >= n_nonzero`` is 0.
        The one formula of both the forward codes and the range search."""
        return torch.round(-torch.log2(x / delta) / self.step).clamp_min_(0)

    def code_index(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        # the log-domain rounding on every device: at a threshold (a rounding tie) and within a
        # float step of one it can differ from the threshold count, and it is what the export runs
        return self.closed_form_codes(x, thresholds)

    def closed_form_codes(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        # elementwise log-domain rounding: the same codes as the thresholds; past the last level,
        # and below 0 (a NaN exponent), the code of the exact zero
        e = self._exponents(x, self.delta)
        return torch.where(e < self._n_nonzero, self._n_nonzero - e, 0).long()

    def __init__(self, bits: int, percentiles: tuple[float, ...] = DEFAULT_PERCENTILES) -> None:
        super().__init__(bits)
        self.percentiles = tuple(percentiles)
        self.register_buffer("delta", torch.ones(()))

    def level_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.remembered("levels", self._level_table)

    def _level_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 defines the table whatever the module's dtype (as TanQQuantizer.level_table)
        levels, thresholds = log_levels(self.delta.float(), self.bits, self.step, self.extra_zero)
        return levels.to(self.delta.dtype), thresholds.to(self.delta.dtype)

    def initialize(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        rows = x.float().reshape(1, -1)
        best = None
        for delta in row_quantiles(rows, self.percentiles)[:, 0]:
            delta = delta.clamp_min(1e-8)
            e = self._exponents(rows, delta)
            x_hat = torch.exp2(e * -self.step).mul_(delta).masked_fill_(e >= self._n_nonzero, 0.0)
            err = x_hat.sub_(rows).pow_(2).mean()
            if best is None or err < best[0]:
                best = (err, delta)
        self.delta = best[1].to(self.delta)


@register_quantizer("logsqrt2")
class LogSqrt2Quantizer(LogQuantizer):
    """RepQ-ViT's log-sqrt2 quantizer: ``d * 2^(-q/2)`` for codes ``0..2^b-1`` plus an exact 0.

    Faithful to RepQ-ViT, including its extra zero code (``2^b + 1`` values in all), so that the
    baseline reproduces the published recipe.
    """

    step = 0.5
    extra_zero = True


@register_quantizer("log2")
class Log2Quantizer(LogQuantizer):
    """Power-of-two levels ``d * 2^(-q)``, ``2^b - 1`` of them plus 0 (fits in b bits)."""

    step = 1.0
    extra_zero = False
