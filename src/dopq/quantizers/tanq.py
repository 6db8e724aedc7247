"""TanQ: tangent-warped levels for post-Softmax activations (DopQ-ViT).

Levels, for codes ``k = 0..L-1`` with ``L = 2^b`` and ``u_k = k / (L - 1)``::

    t_k = (atan(c * (u_k - m)) + atan(c * m)) / (atan(c * (1 - m)) + atan(c * m))
    level_k = d * t_k

``t_0 = 0`` and ``t_{L-1} = 1`` exactly, so 0 and the clip ``d`` are always levels. ``atan`` is
flat far from ``m``, so the levels crowd at both ends (near 0 and near ``d``) and thin out around
``m * d``; ``c -> 0`` gives the uniform grid. ``m = 1/2`` is the symmetric form in method.md.
Codes are the nearest level (thresholds at level midpoints); dequantization is a table lookup.
``(c, m, d)`` are searched on calibration data (``docs/tanq.md``). With ``grid_bits`` the midpoints
are snapped onto the ``2^-grid_bits`` grid once the levels are set, so that a code is one table
read per element (docs/export.md).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from dopq.quantizers.base import register_quantizer
from dopq.quantizers.levels import (
    LevelQuantizer,
    _with_ste,
    attention_error,
    lookup,
    snap_thresholds,
    snapped_in,
)
from dopq.quantizers.ranges import row_quantiles

__all__ = ["TANQ_OBJECTIVES", "TanQQuantizer", "sample_attention", "tan_codes", "tan_levels"]

# how TanQ scores its (sharpness, centre, clip) candidates: the error of attn @ v, or of attn itself
TANQ_OBJECTIVES = ("output", "mse")

DEFAULT_SHARPNESS = (0.01, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0)
DEFAULT_CENTERS = (0.35, 0.5)
DEFAULT_CLIP_QUANTILES = (1.0, 0.9999, 0.999)


def tan_levels(
    sharpness: torch.Tensor, center: torch.Tensor, clip: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """TanQ levels and nearest-level thresholds; broadcasts over leading candidate dims.

    Args:
        sharpness: ``c > 0``; scalar or ``(K,)``.
        center: ``m`` in (0, 1); same shape as ``sharpness``.
        clip: ``d``, the largest level; same shape.
        bits: bit width.

    Returns:
        ``(levels, thresholds)`` of shapes ``(..., 2^b)`` and ``(..., 2^b - 1)``.
    """
    c, m, d = (t.unsqueeze(-1) for t in (sharpness, center, clip))
    u = torch.linspace(0, 1, 2**bits, dtype=c.dtype, device=c.device)
    lo = torch.atan(c * m)
    t = (torch.atan(c * (u - m)) + lo) / (torch.atan(c * (1 - m)) + lo)
    t = torch.cat([torch.zeros_like(t[..., :1]), t[..., 1:-1], torch.ones_like(t[..., :1])], -1)
    levels = d * t
    return levels, (levels[..., 1:] + levels[..., :-1]) / 2


def tan_codes(
    x: torch.Tensor,
    sharpness: torch.Tensor,
    center: torch.Tensor,
    clip: torch.Tensor,
    bits: int,
    thresholds: torch.Tensor,
) -> torch.Tensor:
    """Nearest-level codes, computed elementwise instead of by a binary search.

    The inverse warp gives the level interval ``j`` of ``x`` (up to rounding at a level, where
    ``j`` may be one too low or too high); one comparison with the midpoint ``thresholds[j]`` then
    picks the nearest of ``j, j+1``, which is right in every one of those cases. Parameters may
    carry a leading candidate dim ``(K,)`` against ``x`` of shape ``(S,)``, giving ``(K, S)``.
    """
    n = 2**bits - 1
    c, m, d = sharpness, center, clip
    if c.ndim:
        c, m, d = c[:, None], m[:, None], d[:, None]
    lo = torch.atan(c * m)
    u = (x / d).clamp_(0, 1).mul_(torch.atan(c * (1 - m)) + lo).sub_(lo).tan_().div_(c).add_(m)
    j = u.mul_(n).floor_().clamp_(0, n - 1).long()
    th = lookup(thresholds, j) if thresholds.ndim == 1 else torch.gather(thresholds, 1, j)
    return j.add_(x > th)


def sample_attention(
    attn: torch.Tensor, values: torch.Tensor | None, max_rows: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A fixed random subset of attention rows ``(R, N)`` and their value matrices ``(R, N, D)``.

    ``attn`` is ``(..., N_q, N)`` and ``values`` ``(..., N, D)`` with the same leading dims.
    """
    n = attn.shape[-1]
    rows = attn.reshape(-1, n)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(rows.shape[0], generator=gen)[:max_rows].to(attn.device)
    if values is None:
        return rows[idx], None
    per_matrix = attn.shape[-2]
    v = values.reshape(-1, n, values.shape[-1])
    return rows[idx], v[idx // per_matrix]


@register_quantizer("tanq")
class TanQQuantizer(LevelQuantizer):
    """Tangent-warped non-uniform quantizer with searched (sharpness, center, clip).

    Args:
        bits: bit width, 2..8 (``2^bits`` levels including exact 0).
        objective: ``"output"`` scores candidates by the error of ``attn @ v`` (needs the
            ``v`` operand as context), ``"mse"`` by the error of the attention values.
        sharpness, centers, clip_quantiles: the search grid.
        max_rows: attention rows sampled for the search (keeps it cheap and deterministic).
        grid_bits: snap the thresholds onto the ``2^-grid_bits`` grid of ``[0, 1]`` (each moves by at
            most ``2^-(grid_bits + 1)``; :func:`~dopq.quantizers.levels.snap_thresholds`), so that the
            code is ``cells[floor(x * 2^grid_bits)]``; None keeps the exact midpoints. The search scores
            candidates with the exact midpoints.

    Example:
        >>> q = TanQQuantizer(3, objective="mse"); q.observing = True
        >>> a = torch.softmax(torch.randn(2, 4, 16, 16) * 3, -1); _ = q(a)
        >>> torch.equal(q.lookup_table()[q.codes(a)], q(a))
        True
    """

    def __init__(
        self,
        bits: int,
        objective: str = "output",
        sharpness: tuple[float, ...] = DEFAULT_SHARPNESS,
        centers: tuple[float, ...] = DEFAULT_CENTERS,
        clip_quantiles: tuple[float, ...] = DEFAULT_CLIP_QUANTILES,
        max_rows: int = 256,
        grid_bits: int | None = None,
    ) -> None:
        super().__init__(bits)
        if objective not in TANQ_OBJECTIVES:
            raise ValueError(f"TanQ objective must be one of {TANQ_OBJECTIVES}, got {objective!r}")
        if grid_bits is not None and not 8 <= grid_bits <= 20:
            raise ValueError(f"TanQ grid_bits must be in 8..20 or None, got {grid_bits}")
        self.grid_bits = grid_bits
        self.objective = objective
        self.grid = (tuple(sharpness), tuple(centers), tuple(clip_quantiles))
        self.max_rows = max_rows
        self.register_buffer("sharpness", torch.tensor(4.0))
        self.register_buffer("center", torch.tensor(0.5))
        self.register_buffer("clip", torch.tensor(1.0))

    def closed_form_codes(self, x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        params = [p.detach() for p in self._params()]
        return tan_codes(x, *params, self.bits, thresholds)

    def warp_params(self) -> tuple[float, float, float]:
        """The effective ``(sharpness c, center m, clip d)`` that define the levels."""
        c, m, d = (float(p.detach()) for p in self._params())
        return c, m, d

    def _params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # learned parameters are kept in their valid ranges
        return self.sharpness.clamp_min(1e-3), self.center.clamp(0.05, 0.95), self.clip.clamp_min(1e-6)

    def fake_quantize(self, x: torch.Tensor) -> torch.Tensor:
        levels, thresholds = self.level_table()
        codes = self.code_index(x.detach(), thresholds.detach())
        out = _with_ste(lookup(levels.detach(), codes), x)  # the table value, STE for x
        if levels.requires_grad:
            # gradients to (c, m, d) through the level formula evaluated per element: a sum
            # reduction, deterministic, unlike the scatter-add behind levels[codes]'s backward
            c, m, d = self._params()
            u = codes.to(x.dtype) / (2**self.bits - 1)
            lo = torch.atan(c * m)
            value = d * (torch.atan(c * (u - m)) + lo) / (torch.atan(c * (1 - m)) + lo)
            out = out + (value - value.detach())
        return out

    def initialize(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        values = context if self.objective == "output" else None
        if values is not None and values.shape[:-2] != x.shape[:-2]:
            raise ValueError("TanQ 'output' objective needs v with the attention's leading dims")
        rows, v = sample_attention(x.float(), None if values is None else values.float(), self.max_rows)
        flat = x.float().reshape(1, -1)
        clips = list(row_quantiles(flat, self.grid[2])[:, 0])
        cands = list(itertools.product(self.grid[0], self.grid[1], clips))
        c = torch.tensor([k[0] for k in cands], device=x.device)
        m = torch.tensor([k[1] for k in cands], device=x.device)
        d = torch.stack([k[2] for k in cands]).clamp_min(1e-6)
        levels, thresholds = tan_levels(c, m, d, self.bits)
        codes = tan_codes(rows.reshape(-1), c, m, d, self.bits, thresholds)
        x_hat = torch.gather(levels, 1, codes).reshape(len(cands), *rows.shape)
        errors = attention_error(rows, x_hat, v)
        best = int(errors.argmin())
        self.sharpness = c[best].to(self.sharpness)
        self.center = m[best].to(self.center)
        self.clip = d[best].to(self.clip)

    def make_learnable(self) -> list[nn.Parameter]:
        """Turn (sharpness, center, clip) into trainable parameters (block reconstruction)."""
        params = []
        for name in ("sharpness", "center", "clip"):
            value = getattr(self, name)
            if not isinstance(value, nn.Parameter):
                delattr(self, name)
                setattr(self, name, nn.Parameter(value.detach().clone()))
            params.append(getattr(self, name))
        return params

    def level_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.remembered("levels", self._level_table)

    @torch.compiler.disable  # data-dependent checks (snap_thresholds): compiled, a warned graph break
    def _level_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 defines the table, whatever the module's dtype: a float64 evaluation then uses
        # the float32 model's levels and thresholds exactly (docs/export.md, float64 form)
        params = self._params()
        levels, thresholds = tan_levels(*(p.float() for p in params), self.bits)
        if self.grid_bits is not None:
            snapped = snap_thresholds(levels, thresholds, self.grid_bits)
            if snapped is not None:
                thresholds = snapped_in(snapped, params[0].dtype)
        return levels.to(params[0].dtype), thresholds.to(params[0].dtype)

    def off_grid(self) -> bool:
        """Asked for a threshold grid (``grid_bits``) too coarse for this table: the thresholds keep
        their exact midpoints (:func:`~dopq.quantizers.levels.snap_thresholds`), and the export
        compares with each of them instead of reading one table."""
        if self.grid_bits is None:
            return False
        levels, thresholds = tan_levels(*(p.detach().float() for p in self._params()), self.bits)
        return snap_thresholds(levels, thresholds, self.grid_bits) is None

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, objective={self.objective}, c={float(self.sharpness):.3g}, "
            f"m={float(self.center):.3g}, d={float(self.clip):.3g}, grid_bits={self.grid_bits}"
        )
