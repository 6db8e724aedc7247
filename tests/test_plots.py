"""Tests of dopq.plots on timm's tiny ``test_vit``: attention capture, quantizer levels, PNG output."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from dopq import plots
from dopq.cli import build_parser, main
from dopq.errors import ConfigError
from dopq.plots import (
    check_plot_request,
    collect_attention,
    fit_softmax_quantizers,
    ln_channel_scales,
    plot_attention_levels,
    plot_ln_scales,
    write_plots,
)

NUM_BLOCKS = 6  # test_vit: depth 6, 2 heads, embed 64, 160x160 input in 16x16 patches
TOKENS = (160 // 16) ** 2 + 1


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", num_classes=10).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ImageFolder tree: 2 classes x 2 random 32x32 PNGs in train/."""
    root = tmp_path_factory.mktemp("plots") / "data"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        for i in range(2):
            path = root / "train" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return root


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 0 and img.size[1] > 0
        img.verify()


def _reference_attention(model: nn.Module, images: torch.Tensor, block: int) -> torch.Tensor:
    """softmax(q k^T * scale) computed from the timm block's own layers on its real input."""
    attn = model.blocks[block].attn
    inputs: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda _m, args: inputs.append(args[0]))
    with torch.no_grad():
        model(images)
        handle.remove()
        x = inputs[0]
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)


@pytest.mark.parametrize("block", [0, NUM_BLOCKS - 1])
def test_collect_attention_is_the_float_softmax(model: nn.Module, images: torch.Tensor, block: int) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn = collect_attention(model, images, block)
    assert attn.shape == (2, 2, TOKENS, TOKENS)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 2, TOKENS))
    torch.testing.assert_close(attn, _reference_attention(model, images, block), rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model untouched
    assert not any("Quant" in type(m).__name__ for m in model.modules())


@pytest.mark.parametrize("block", [NUM_BLOCKS, -1])
def test_collect_attention_out_of_range(model: nn.Module, images: torch.Tensor, block: int) -> None:
    with pytest.raises(ConfigError, match=rf"index {block} is out of range.*valid 0\.\.{NUM_BLOCKS - 1}"):
        collect_attention(model, images, block)


def test_fit_softmax_quantizers(model: nn.Module, images: torch.Tensor) -> None:
    attn = collect_attention(model, images, 0)
    fitted = fit_softmax_quantizers(attn, bits=3)
    assert list(fitted) == ["uniform", "log2", "logsqrt2", "tanq"]
    # log-sqrt2 keeps RepQ-ViT's extra zero code: 2^b non-zero levels plus 0
    assert {k: len(v[0]) for k, v in fitted.items()} == {"uniform": 8, "log2": 8, "logsqrt2": 9, "tanq": 8}
    for levels, mse in fitted.values():
        assert torch.all(levels[1:] >= levels[:-1])
        assert 0 <= mse < float(attn.pow(2).mean())  # better than quantizing everything to 0


def test_ln_channel_scales(model: nn.Module, images: torch.Tensor) -> None:
    name, scales, zero_points = ln_channel_scales(model, images, 1, bits=4)
    assert name == "blocks.0.norm2 -> blocks.0.mlp.fc1"
    assert scales.shape == zero_points.shape == (64,)
    assert torch.all(scales > 0) and torch.all((zero_points >= 0) & (zero_points <= 15))
    with pytest.raises(ConfigError, match=r"pair index 12 is out of range.*valid 0\.\.11"):
        ln_channel_scales(model, images, 2 * NUM_BLOCKS)


def test_plots_write_valid_pngs(model: nn.Module, images: torch.Tensor, tmp_path: Path) -> None:
    attn = collect_attention(model, images, 1)
    path = plot_attention_levels(attn, 4, tmp_path / "sub" / "attn.png", "test_vit block 1")
    assert path == tmp_path / "sub" / "attn.png"
    _assert_png(path)
    _, scales, zero_points = ln_channel_scales(model, images, 0, bits=4)
    _assert_png(plot_ln_scales(scales, tmp_path / "ln.png", "test_vit pair 0", zero_points))
    _assert_png(plot_ln_scales(scales, tmp_path / "ln_noz.png", "no zero points"))


def _drawn_figures(monkeypatch: pytest.MonkeyPatch) -> list[Figure]:
    """The figures dopq.plots saves from now on, drawn."""
    figures: list[Figure] = []
    save = plots._save

    def keep(fig: Figure, path: str | Path) -> Path:
        figures.append(fig)
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def test_levels_at_the_ends_of_the_range_are_drawn_inside_the_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attention that reaches 1 puts levels at 0 and at 1 (the clip): each lies inside its row's
    x range, not on the frame, where the axes' spines hid it (log2's one level in the zoom, 1.0,
    left its row blank beside '1 in zoom')."""
    figures = _drawn_figures(monkeypatch)
    attn = torch.softmax(8 * torch.randn(2, 2, 16, 16, generator=torch.Generator().manual_seed(0)), -1)
    assert float(attn.max()) > 0.999
    plot_attention_levels(attn, 4, tmp_path / "attn.png", "levels at the ends")
    at_ends = 0
    for ax in figures[0].axes:
        lo, hi = ax.get_xlim()
        for collection in ax.collections:
            if isinstance(collection, LineCollection):  # one vertical line per level
                xs = [float(segment[0][0]) for segment in collection.get_segments()]
                drawn = [x for x in xs if lo - 1e-9 <= x <= hi + 1e-9]  # the zoom shows [0.5, 1] only
                assert all(lo < x < hi for x in drawn), (ax.get_ylabel(), (lo, hi), drawn)
                at_ends += sum(x in (0.0, 1.0) for x in drawn)
    assert at_ends >= 4  # uniform's 0 and 1, in both panels, at least


def test_a_long_title_stays_inside_the_figure(
    model: nn.Module, images: torch.Tensor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A title longer than the figure is wide (Swin-Tiny's: 'swin_tiny_patch4_window7_224, pair 11
    (layers.2.blocks.0.norm2 -> layers.2.blocks.0.mlp.fc1): 4-bit per-channel input scales') is
    wrapped, not cut off at both edges."""
    figures = _drawn_figures(monkeypatch)
    name = "swin_tiny_patch4_window7_224, pair 11 (layers.2.blocks.0.norm2 -> layers.2.blocks.0.mlp.fc1)"
    title = f"{name}: 4-bit per-channel input scales"
    plot_ln_scales(torch.rand(64) + 0.1, tmp_path / "ln.png", title)
    plot_attention_levels(collect_attention(model, images, 0), 4, tmp_path / "attn.png", 2 * title)
    for fig in figures:
        renderer = fig.canvas.get_renderer()
        assert fig.get_suptitle()
        box = fig._suptitle.get_window_extent(renderer)
        assert box.x0 >= 0 and box.x1 <= fig.bbox.width, (box, fig.bbox.width)


def test_a_figure_stopped_while_written_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Figures are written as results are, atomically: Ctrl-C while one was written left a
    truncated PNG under the final name. The extension still picks the format."""
    savefig = Figure.savefig

    def stopped(fig: Figure, target: Path, **kwargs) -> None:
        Path(target).write_bytes(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", stopped)
    with pytest.raises(KeyboardInterrupt):
        plot_ln_scales(torch.rand(8) + 0.1, tmp_path / "ln.png", "stopped")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(Figure, "savefig", savefig)
    _assert_png(plot_ln_scales(torch.rand(8) + 0.1, tmp_path / "ln.png", "written"))
    assert plot_ln_scales(torch.rand(8) + 0.1, tmp_path / "ln.pdf", "pdf").read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ln.pdf", "ln.png"]


def _plot_argv(data_root: Path, out_dir: Path, *extra: str) -> list[str]:
    return ["plot", "--model", "test_vit", "--num-classes", "10", "--data", str(data_root),
            "--calib-size", "2", "--bits", "4", "--out-dir", str(out_dir), *extra]  # fmt: skip


def test_write_plots_writes_both_pngs(model: nn.Module, images: torch.Tensor, tmp_path: Path) -> None:
    paths = write_plots(model, images, "test_vit", "all", 2, 4, tmp_path)
    assert paths == [tmp_path / "attention_block2_a4.png", tmp_path / "ln_scales_pair2_a4.png"]
    for path in paths:
        _assert_png(path)


def test_plot_requests_are_checked_before_any_data(model: nn.Module) -> None:
    with pytest.raises(ConfigError, match="plot kind must be one of"):
        check_plot_request(model, "histogram", 0, 4)
    with pytest.raises(ConfigError, match=r"--bits must be in 2\.\.8, got 1"):
        check_plot_request(model, "all", 0, 1)
    with pytest.raises(ConfigError, match="LayerNorm -> Linear pair index 12 is out of range"):
        check_plot_request(model, "ln-scales", 12, 4)


def test_the_cli_offers_the_plot_kinds_the_library_draws() -> None:
    import argparse

    from dopq.plots import PLOT_KINDS

    plot = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "plot"
    ]
    assert tuple(next(a for a in plot._actions if a.dest == "kind").choices) == PLOT_KINDS


def test_the_block_index_counts_attention_modules_and_pairs_apart(
    model: nn.Module, images: torch.Tensor, tmp_path: Path
) -> None:
    """--block N is the N-th attention module and the N-th LayerNorm -> Linear pair, and a block has
    two pairs: --kind all --block 2 draws block 2's attention and blocks.1's norm1 -> qkv pair. The
    help said 'index of the attention / LayerNorm pair', as if both were block N's; it says so now."""
    paths = write_plots(model, images, "test_vit", "all", 2, 4, tmp_path)
    assert ln_channel_scales(model, images, 2)[0] == "blocks.1.norm1 -> blocks.1.attn.qkv"
    assert [p.name for p in paths] == ["attention_block2_a4.png", "ln_scales_pair2_a4.png"]
    plot = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "plot"
    ]
    block = " ".join(next(a for a in plot._actions if a.dest == "block").help.split())
    assert "attention module (attention)" in block and "LayerNorm -> Linear pair (ln-scales)" in block
    assert "pair N is not block N's" in block
    assert all(a.help for a in plot._actions), [a.dest for a in plot._actions if not a.help]


def test_plot_cli(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_plot_argv(data_root, tmp_path, "--kind", "ln-scales")) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'ln_scales_pair0_a4.png'}"]
    assert main(_plot_argv(data_root, tmp_path, "--kind", "attention", "--block", "6")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dopq: error: attention block index 6 is out of range")
    assert main(_plot_argv(data_root, tmp_path, "--bits", "9")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dopq: error: --bits must be in 2..8, got 9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ln_scales_pair0_a4.png"]


def test_plot_takes_threads_like_the_other_commands(data_root: Path, tmp_path: Path) -> None:
    import torch

    from dopq.cli import main

    before = torch.get_num_threads()
    wanted = 2 if before != 2 else 1
    try:
        assert main([*_plot_argv(data_root, tmp_path, "--kind", "attention"), "--threads", str(wanted)]) == 0
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(before)
