"""Diagnostic plots: post-Softmax attention with the levels of each quantizer, post-LayerNorm scales.

Two figures explain why DopQ-ViT changes RepQ-ViT's recipe:

* :func:`plot_attention_levels`: the histogram of one block's attention values (log counts, with a
  zoom on [0.5, 1] where large attention sits) and, one row per post-Softmax quantizer (uniform,
  log2, logsqrt2, tanq), the levels each one picks when calibrated on exactly those values, with its
  mean squared error.
* :func:`plot_ln_scales`: the per-channel scales ``d_c`` of the input quantizer of one
  LayerNorm -> Linear pair, sorted, with the layer-wise targets ``d*`` of the ``mean`` (RepQ-ViT),
  ``median`` and ``mad`` rules of the re-parameterization.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend state is touched.

Example:
    >>> import timm
    >>> model = timm.create_model("test_vit", num_classes=10).eval()
    >>> attn = collect_attention(model, torch.randn(2, 3, 160, 160), block=0)
    >>> torch.allclose(attn.sum(-1), torch.ones(()))
    True
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import nn

from dopq.calibrate import calibrate
from dopq.config import MAX_BITS, MIN_BITS, SOFTMAX_QUANTIZERS, get_preset
from dopq.errors import ConfigError
from dopq.files import atomic_path
from dopq.models import (
    QuantPlan,
    example_input,
    find_layernorm_pairs,
    get_adapter,
    prepare_model,
)
from dopq.models.adapters import quantized_attention_classes
from dopq.modules import set_quantization
from dopq.quantizers import LevelQuantizer, Quantizer, UniformQuantizer, build_quantizer
from dopq.reparam import target_scale

__all__ = [
    "PLOT_KINDS",
    "check_plot_request",
    "collect_attention",
    "fit_softmax_quantizers",
    "ln_channel_scales",
    "plot_attention_levels",
    "plot_ln_scales",
    "write_plots",
]

_COLORS = {"uniform": "tab:blue", "log2": "tab:orange", "logsqrt2": "tab:green", "tanq": "tab:red"}
_RULE_STYLES = {"mean": ("tab:blue", "-"), "median": ("tab:orange", "--"), "mad": ("tab:green", ":")}
_ZOOM = (0.5, 1.0)
_EDGE_MARGIN = 0.01  # of the histograms' ranges, beyond each end


# --------------------------------------------------------------------------------------------------
# Data collection
# --------------------------------------------------------------------------------------------------


def _check_index(index: int, count: int, noun: str) -> None:
    if not 0 <= index < count:
        raise ConfigError(
            f"{noun} index {index} is out of range: the model has {count} {noun}s, valid 0..{count - 1}"
        )


def _prepared_copy(model: nn.Module, bits: int = 8) -> tuple[nn.Module, QuantPlan]:
    """A deep copy of a float model with RepQ-ViT's quantizer placement, and its plan."""
    prepared = copy.deepcopy(model).eval()
    plan = prepare_model(prepared, get_preset("repq", w_bits=bits, a_bits=bits))
    return prepared, plan


@torch.no_grad()
def collect_attention(model: nn.Module, images: torch.Tensor, block: int) -> torch.Tensor:
    """The float post-Softmax attention map fed to ``attn @ v`` in the ``block``-th attention module.

    The model itself is not changed: a copy gets dopq's explicit attention modules with every
    quantizer switched off (so it computes exactly the float function), and a hook on the
    ``block``-th ``matmul_av`` records its first operand.

    Args:
        model: a float timm ViT/DeiT/Swin.
        images: input batch ``(B, 3, H, W)`` on the model's device.
        block: index of the attention module in forward order (0-based).

    Returns:
        The attention on the CPU, ``(B, heads, N, N)`` for ViT (``(B * windows, heads, N, N)`` for
        Swin); every row sums to 1.

    Raises:
        ConfigError: ``block`` is out of range.
        ModelError: the model family is not supported.
    """
    prepared, _ = _prepared_copy(model)
    set_quantization(prepared, False, False)
    matmuls = [m.matmul_av for m in prepared.modules() if isinstance(m, quantized_attention_classes())]
    _check_index(block, len(matmuls), "attention block")
    captured: list[torch.Tensor] = []
    handle = matmuls[block].register_forward_pre_hook(
        lambda _m, args: captured.append(args[0].detach().cpu())
    )
    with handle:  # removes the hook on leaving
        prepared(images)
    return captured[0]


@torch.no_grad()
def ln_channel_scales(
    model: nn.Module, images: torch.Tensor, pair_index: int, bits: int = 4
) -> tuple[str, torch.Tensor, torch.Tensor]:
    """Per-channel scales and zero points of the input quantizer of one LayerNorm -> Linear pair.

    A copy of the model is prepared with RepQ-ViT's placement at ``bits`` and calibrated on
    ``images``; the pair's Linear input quantizer then holds the per-channel ``(d_c, z_c)`` that the
    re-parameterization turns into one layer-wise ``(d*, z*)``.

    Args:
        model: a float timm ViT/DeiT/Swin.
        images: calibration batch ``(B, 3, H, W)`` on the model's device.
        pair_index: index of the pair in forward order (0-based).
        bits: activation and weight bits of the calibration.

    Returns:
        ``(name, scales, zero_points)``: ``"norm -> linear[, linear]"`` and two ``(C,)`` CPU tensors.

    Raises:
        ConfigError: ``pair_index`` is out of range.
    """
    prepared, plan = _prepared_copy(model, bits)
    _check_index(pair_index, len(plan.pairs), "LayerNorm -> Linear pair")
    calibrate(prepared, images)
    pair = plan.pairs[pair_index]
    quantizer: UniformQuantizer = prepared.get_submodule(pair.linears[0]).input_quantizer
    name = f"{pair.norm} -> {', '.join(pair.linears)}"
    return name, quantizer.scale.detach().cpu(), quantizer.zero_point.detach().cpu()


def _levels(q: Quantizer) -> torch.Tensor:
    if isinstance(q, LevelQuantizer):
        return q.lookup_table()
    if isinstance(q, UniformQuantizer):
        codes = torch.arange(q.levels, dtype=q.scale.dtype, device=q.scale.device)
        return (codes - q.zero_point) * q.scale
    raise TypeError(f"cannot list the levels of {type(q).__name__}")


@torch.no_grad()
def fit_softmax_quantizers(attn: torch.Tensor, bits: int) -> dict[str, tuple[torch.Tensor, float]]:
    """Calibrate every post-Softmax quantizer on ``attn`` and report its levels and error.

    TanQ uses its ``mse`` objective (no ``v`` operand here); the others their default searches.

    Args:
        attn: attention values, any shape.
        bits: bit width of every quantizer.

    Returns:
        ``{name: (levels, mse)}`` in :data:`dopq.config.SOFTMAX_QUANTIZERS` order; levels ascending
        on the CPU, mse the mean squared error of the fake-quantized values.
    """
    attn = attn.float()
    fitted = {}
    for name in SOFTMAX_QUANTIZERS:
        q = build_quantizer(name, bits, objective="mse") if name == "tanq" else build_quantizer(name, bits)
        q.observing = True
        err = float((q(attn) - attn).pow(2).mean())
        fitted[name] = (_levels(q).float().cpu().sort().values, err)
    return fitted


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` atomically (as results are: a run stopped while drawing, Ctrl-C,
    left a truncated PNG), in the format its extension names (PNG without one)."""
    path = Path(path)
    with atomic_path(path) as tmp:  # the temporary's own extension would name no format
        fig.savefig(tmp, dpi=110, format=path.suffix[1:] or "png")
    return path


def _histogram(ax: Axes, values: np.ndarray, lo: float, hi: float, bins: int) -> None:
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    ax.stairs(counts, edges, fill=True, color="0.55")
    # a margin: levels at 0 and at 1 (the clip of most post-Softmax quantizers) lay on the frame,
    # hidden by it, in the rows below that share these limits
    margin = _EDGE_MARGIN * (hi - lo)
    ax.set_xlim(lo - margin, hi + margin)
    if counts.any():
        ax.set_yscale("log")
    else:
        ax.set_yticks([])
        ax.text(0.5, 0.5, f"no values in [{lo:g}, {hi:g}]", transform=ax.transAxes, ha="center", va="center")


def _draw_levels(ax: Axes, levels: np.ndarray, color: str, label: str, side: str, bottom: bool) -> None:
    """One quantizer row: a vertical line per level, ``label`` beside the row on ``side``."""
    ax.vlines(levels, 0, 1, color=color, linewidth=1.2)
    ax.set_ylim(0, 1)
    ax.set_yticks([])
    ax.yaxis.set_label_position(side)
    ax.set_ylabel(label, rotation=0, ha="right" if side == "left" else "left", va="center", fontsize=9)
    if bottom:
        ax.set_xlabel("attention value")
    else:
        ax.tick_params(labelbottom=False)


def plot_attention_levels(attn: torch.Tensor, bits: int, path: str | Path, title: str) -> Path:
    """Histogram of attention values with the levels of each post-Softmax quantizer.

    Layout: the top row is the histogram (log-scaled counts) over [0, 1] and, on the right, zoomed
    on [0.5, 1]; below it one row per quantizer (uniform, log2, logsqrt2, tanq) marks the levels it
    picks when calibrated on ``attn``. The legend gives each quantizer's mean squared error.

    Args:
        attn: attention values, e.g. from :func:`collect_attention`.
        bits: bit width of the quantizers.
        path: the file to write, in the format its extension names (PNG, PDF, SVG; parent folders
            are created).
        title: figure title.

    Returns:
        ``path``.
    """
    fitted = fit_softmax_quantizers(attn, bits)
    values = attn.detach().float().reshape(-1).cpu().numpy()
    fig = _new_figure(11, 2.6 + 0.75 * len(fitted))
    grid = fig.add_gridspec(1 + len(fitted), 2, height_ratios=[4] + [1] * len(fitted), width_ratios=[2, 1])
    full, zoom = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    _histogram(full, values, 0.0, 1.0, 200)
    _histogram(zoom, values, *_ZOOM, 50)
    full.set_ylabel("count (log)")
    full.set_title(f"{values.size:,} values, max {values.max():.3f}", fontsize=9)
    zoom.set_title(f"zoom on [{_ZOOM[0]:g}, {_ZOOM[1]:g}]: {(values >= _ZOOM[0]).sum():,} values", fontsize=9)
    last = len(fitted)
    for row, (name, (levels, _)) in enumerate(fitted.items(), start=1):
        lv, color = levels.numpy(), _COLORS.get(name, "k")
        in_zoom = int(((lv >= _ZOOM[0]) & (lv <= _ZOOM[1])).sum())
        _draw_levels(fig.add_subplot(grid[row, 0], sharex=full), lv, color, name, "left", row == last)
        _draw_levels(
            fig.add_subplot(grid[row, 1], sharex=zoom), lv, color, f"{in_zoom} in zoom", "right", row == last
        )
    handles = [
        Line2D([], [], color=_COLORS.get(name, "k"),
               label=f"{name}: {len(levels)} levels up to {float(levels.max()):.3g}, MSE {mse:.3g}")
        for name, (levels, mse) in fitted.items()
    ]  # fmt: skip
    full.tick_params(labelbottom=False)
    zoom.tick_params(labelbottom=False)
    full.legend(handles=handles, title=f"{bits}-bit quantizer levels", loc="upper right", fontsize=8)
    fig.suptitle(title, wrap=True)  # a long title (Swin's module names) ran off both edges
    return _save(fig, path)


def plot_ln_scales(
    scales: torch.Tensor, path: str | Path, title: str, zero_points: torch.Tensor | None = None
) -> Path:
    """Sorted per-channel scales with the layer-wise targets of the mean, median and MAD rules.

    Args:
        scales: per-channel scales ``d_c``, ``(C,)``.
        path: the file to write, in the format its extension names (PNG, PDF, SVG; parent folders
            are created).
        title: figure title.
        zero_points: per-channel zero points ``z_c`` (zeros when omitted; the target scale of these
            rules does not depend on them).

    Returns:
        ``path``.
    """
    d = scales.detach().float().reshape(-1).cpu()
    z = torch.zeros_like(d) if zero_points is None else zero_points.detach().float().reshape(-1).cpu()
    ordered = d.sort().values.numpy()
    fig = _new_figure(10, 4.8)
    ax = fig.add_subplot()
    ax.bar(
        np.arange(len(ordered)), ordered, width=1.0, color="0.6", label=rf"$d_c$ ({len(ordered)} channels)"
    )
    for rule, (color, style) in _RULE_STYLES.items():
        d_t, z_t = target_scale(rule, d, z)
        ax.axhline(float(d_t), color=color, linestyle=style, linewidth=2,
                   label=rf"{rule}: $d^*$ = {float(d_t):.4g}, $z^*$ = {float(z_t):.3g}")  # fmt: skip
    if ordered[0] > 0 and ordered[-1] / ordered[0] > 30:
        ax.set_yscale("log")
    ax.set_xlim(-0.5, len(ordered) - 0.5)
    ax.set_xlabel("channel (sorted by scale)")
    ax.set_ylabel(r"per-channel scale $d_c$")
    ratio = ordered[-1] / max(float(np.median(ordered)), 1e-12)
    ax.set_title(f"max / median scale = {ratio:.2f}", fontsize=9)
    ax.legend(loc="upper left", fontsize=9)
    fig.suptitle(title, wrap=True)  # a long title (Swin's module names) ran off both edges
    return _save(fig, path)


# --------------------------------------------------------------------------------------------------
# One model's figures (``dopq plot``)
# --------------------------------------------------------------------------------------------------

PLOT_KINDS = ("attention", "ln-scales", "all")


def check_plot_request(model: nn.Module, kind: str, block: int, bits: int) -> None:
    """Refuse a request :func:`write_plots` cannot draw before any data is read.

    Raises:
        ConfigError: an unknown kind, ``bits`` outside the supported widths, or ``block`` out of range.
        ModelError: the model family is not supported.
    """
    if kind not in PLOT_KINDS:
        raise ConfigError(f"plot kind must be one of {PLOT_KINDS}, got {kind!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise ConfigError(f"--bits must be in {MIN_BITS}..{MAX_BITS}, got {bits}")
    adapter = get_adapter(model)
    if kind in ("attention", "all"):
        count = sum(type(m) in adapter.attention for m in model.modules())
        _check_index(block, count, "attention block")
    if kind in ("ln-scales", "all"):
        pairs = find_layernorm_pairs(model, example_input(model))
        _check_index(block, len(pairs), "LayerNorm -> Linear pair")


def write_plots(
    model: nn.Module, images: torch.Tensor, arch: str, kind: str, block: int, bits: int, out_dir: Path
) -> list[Path]:
    """Draw ``model``'s figures from calibration ``images``: the attention of the ``block``-th
    attention module with each post-Softmax quantizer's levels, and/or the post-LN channel scales of
    the ``block``-th LayerNorm -> Linear pair with the MOSF targets.

    Args:
        model: the float model (not changed).
        images: calibration images on the model's device.
        arch: the model's name, for the titles.
        kind: ``"attention"``, ``"ln-scales"`` or ``"all"``.
        block: the attention module's or the pair's index (0-based, forward order).
        bits: the quantizers' width.
        out_dir: where the PNGs go.

    Returns:
        The written files: ``attention_block{N}_a{bits}.png`` and/or ``ln_scales_pair{N}_a{bits}.png``.
    """
    check_plot_request(model, kind, block, bits)
    paths = []
    if kind in ("attention", "all"):
        attn = collect_attention(model, images, block)
        title = f"{arch}, attention block {block}: post-Softmax values of {len(images)} images"
        path = Path(out_dir) / f"attention_block{block}_a{bits}.png"
        paths.append(plot_attention_levels(attn, bits, path, title))
    if kind in ("ln-scales", "all"):
        name, scales, zero_points = ln_channel_scales(model, images, block, bits)
        title = f"{arch}, pair {block} ({name}): {bits}-bit per-channel input scales"
        path = Path(out_dir) / f"ln_scales_pair{block}_a{bits}.png"
        paths.append(plot_ln_scales(scales, path, title, zero_points))
    return paths
