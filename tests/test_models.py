"""Model adapters: structural discovery of quantization sites and FP equivalence with timm."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DEIT, SWIN, require
from dopq.config import get_preset
from dopq.errors import CheckpointError, ModelError
from dopq.models import (
    QuantAttention,
    QuantWindowAttention,
    build_model,
    find_layernorm_pairs,
    get_adapter,
    prepare_model,
)
from dopq.modules import QuantConv2d, QuantLinear, QuantMatMul, quantizers_of, set_quantization
from dopq.quantizers import PerChannel


def _max_fp_diff(model: nn.Module, x: torch.Tensor) -> float:
    ref = copy.deepcopy(model)
    prepare_model(model, get_preset("dopq"))
    set_quantization(model, weights=False, activations=False)
    with torch.no_grad():
        return float((model(x) - ref(x)).abs().max())


@pytest.mark.parametrize(
    ("arch", "ckpt"),
    [("deit_tiny_patch16_224", DEIT), ("swin_tiny_patch4_window7_224", SWIN)],
)
def test_wrapped_shared_models_reproduce_timm(arch, ckpt):
    model = build_model(arch, require(ckpt))
    x = torch.randn(2, 3, 224, 224)
    assert _max_fp_diff(model, x) <= 1e-5


@pytest.mark.parametrize(
    ("name", "kwargs", "size"),
    [
        ("test_vit", {}, 160),
        ("vit_tiny_patch16_224", {"qk_norm": True, "depth": 2}, 224),  # q_norm/k_norm are LayerNorms too
        ("deit_tiny_distilled_patch16_224", {"depth": 2}, 224),
        (
            "swin_tiny_patch4_window7_224",
            {"depths": (1, 1, 1, 1), "embed_dim": 32, "num_heads": (1, 2, 2, 2)},
            224,
        ),
    ],
)
def test_wrapped_small_models_reproduce_timm(name, kwargs, size):
    model = timm.create_model(name, num_classes=7, **kwargs).eval()
    assert _max_fp_diff(model, torch.randn(2, 3, size, size)) <= 1e-5


def test_layernorm_pairs_found_from_the_graph():
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", depths=(2, 2, 2, 2), embed_dim=32, num_heads=(1, 2, 2, 2)
    )
    pairs = {p.norm: p.linears for p in find_layernorm_pairs(model.eval(), torch.zeros(1, 3, 224, 224))}
    assert pairs["layers.0.blocks.1.norm1"] == [
        "layers.0.blocks.1.attn.qkv"
    ]  # through roll + window partition
    assert pairs["layers.1.downsample.norm"] == ["layers.1.downsample.reduction"]
    assert "norm" not in pairs  # the head reads pooled features, not a LayerNorm output
    assert len(pairs) == 8 * 2 + 3


class _PaddedNorm(nn.Module):
    """A LayerNorm output padded (or cropped) along the tokens before the Linear that reads it."""

    def __init__(self, pad: tuple[int, ...]) -> None:
        super().__init__()
        self.norm, self.fc, self.pad = nn.LayerNorm(8), nn.Linear(8, 8), pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.pad(self.norm(x), self.pad))


@pytest.mark.parametrize(
    ("pad", "paired"),
    [((0, 0, 0, 0), True), ((0, 0, 0, 2), False), ((0, 0, 1, 0), False)],
    ids=["nothing", "pad-after", "pad-before"],
)
def test_only_a_pad_that_adds_no_tokens_keeps_a_pair(pad: tuple[int, ...], paired: bool) -> None:
    """A padded token is 0 before a fold and would have to stay what 0 was after it, which a
    per-channel scale and shift cannot give: a pad that adds tokens ends the pair."""
    pairs = find_layernorm_pairs(_PaddedNorm(pad), torch.zeros(2, 5, 8))
    assert [(p.norm, p.linears) for p in pairs] == ([("norm", ["fc"])] if paired else [])


def test_swin_with_windows_padded_over_the_token_grid_quantizes_and_keeps_its_function() -> None:
    """A 10 x 10 token grid under 4 x 4 windows: Swin zero-pads each block's LayerNorm output to
    12 x 12 before ``qkv`` (the second stage 5 x 5 to 8 x 8). Those LayerNorms are not folded (the
    re-parameterization used to refuse the model, its float check failing); the MLPs' and the patch
    merging's are."""
    import dopq

    kwargs = dict(embed_dim=32, depths=(1, 1), num_heads=(1, 2), img_size=40, window_size=4, num_classes=10)
    model = _randomize(timm.create_model("swin_tiny_patch4_window7_224", **kwargs).eval())
    x = torch.randn(4, 3, 40, 40)
    pairs = {p.norm for p in find_layernorm_pairs(model, x)}
    assert pairs == {"layers.0.blocks.0.norm2", "layers.1.downsample.norm", "layers.1.blocks.0.norm2"}
    with torch.no_grad():
        y_ref = model(x)
    qmodel, report = dopq.quantize_with_report(
        copy.deepcopy(model), x, get_preset("dopq", w_bits=8, a_bits=8), progress=False
    )
    assert report.reparam.max_logit_change <= 1e-4
    assert report.coverage.quantized["LayerNorm re-parameterized"] == 3
    with torch.no_grad():
        y = qmodel(x)
    assert float(F.cosine_similarity(y, y_ref).min()) > 0.99  # W8/A8 close to the float model


@pytest.mark.parametrize(
    ("name", "kwargs", "pooled_norm"),
    [
        ("vit_base_patch16_224", dict(fc_norm=True, global_pool="avg"), "fc_norm"),
        ("beit_base_patch16_224", {}, "fc_norm"),
    ],
    ids=["vit-fc-norm", "beit-mean-pooling"],
)
def test_a_layernorm_of_one_pooled_vector_per_image_is_not_a_pair(
    name: str, kwargs: dict, pooled_norm: str
) -> None:
    """Per-channel ranges of a pooled vector would rest on one value per calibration image."""
    model = timm.create_model(name, embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8, **kwargs)
    pairs = {p.norm: p.linears for p in find_layernorm_pairs(model.eval(), torch.zeros(2, 3, 32, 32))}
    assert pooled_norm not in pairs and not any("head" in linears for linears in pairs.values())
    assert pairs["blocks.0.norm2"] == ["blocks.0.mlp.fc1"]  # token-wise pairs stay


class _OddNames(nn.Module):
    """Roles are not spelled in names: a LayerNorm called 'alpha' feeding a Linear called 'beta'."""

    def __init__(self) -> None:
        super().__init__()
        self.alpha = nn.LayerNorm(8)
        self.beta = nn.Linear(8, 8)
        self.qkv = nn.Linear(8, 8)  # named like a consumer but fed by beta, not by a LayerNorm

    def forward(self, x):
        return self.qkv(self.beta(self.alpha(x).permute(1, 0, 2)))


def test_pairs_do_not_depend_on_names():
    pairs = find_layernorm_pairs(_OddNames(), torch.zeros(3, 4, 8))
    assert [(p.norm, p.linears) for p in pairs] == [("alpha", ["beta"])]


def test_placement_follows_repq():
    model = timm.create_model("test_vit", num_classes=5).eval()
    plan = prepare_model(model, get_preset("repq", w_bits=3, a_bits=5))
    paired = plan.paired_linears
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert linears and all(m.weight_quantizer.granularity == PerChannel(0) for m in linears.values())
    for name, m in linears.items():
        per_channel = isinstance(m.input_quantizer.granularity, PerChannel)
        assert per_channel == (name in paired)
        assert m.input_quantizer.bits == 5 and m.weight_quantizer.bits == 3
    conv = model.patch_embed.proj
    assert isinstance(conv, QuantConv2d) and conv.input_quantizer.bits == 8
    attn = model.blocks[0].attn
    assert isinstance(attn, QuantAttention) and isinstance(attn.matmul_av, QuantMatMul)
    assert type(attn.matmul_av.quantizer_a).__name__ == "LogSqrt2Quantizer"
    assert "head" in linears and "head" not in paired
    n_quantizers = len(list(quantizers_of(model)))
    blocks = len(model.blocks)
    # per block: 4 Linear x 2 + 2 matmuls x 2; plus patch embed conv x 2 and head x 2
    assert n_quantizers == blocks * 12 + 4


def test_swin_attention_is_swapped():
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 2, 2)
    )
    prepare_model(model.eval(), get_preset("dopq"))
    assert isinstance(model.layers[0].blocks[0].attn, QuantWindowAttention)
    assert type(model.layers[0].blocks[0].attn.matmul_av.quantizer_a).__name__ == "TanQQuantizer"


def test_unsupported_family_is_refused():
    with pytest.raises(ModelError, match="unsupported model family ResNet"):
        get_adapter(timm.create_model("resnet18"))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(ModelError, match="unknown timm model"):
        build_model("deit_tiny_patch16_2244")
    with pytest.raises(CheckpointError, match="does not exist"):
        build_model("deit_tiny_patch16_224", tmp_path / "none.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="could not be read"):
        build_model("deit_tiny_patch16_224", bad)
    with pytest.raises(CheckpointError, match="does not match"):
        build_model("deit_tiny_patch16_224", require(DEIT), num_classes=100)
    with pytest.raises(CheckpointError, match="does not fit"):
        build_model("deit_small_patch16_224", require(DEIT))


class _PlainAttention(nn.Module):
    """Multi-head self-attention written out by hand: a class no adapter knows."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, **_: object) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


def _float_counts(model: nn.Module) -> tuple[int, int]:
    return sum(isinstance(m, nn.Linear) for m in model.modules()), sum(
        isinstance(m, nn.Conv2d) for m in model.modules()
    )


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("test_vit", {}), ("swin_tiny_patch4_window7_224", dict(img_size=56, depths=(1, 1), num_heads=(1, 2), embed_dim=32))],
)  # fmt: skip
def test_coverage_counts_match_the_model(name: str, kwargs: dict) -> None:
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    linears, convs = _float_counts(model)
    blocks = sum(
        isinstance(m, (timm.layers.Attention, timm.models.swin_transformer.WindowAttention))
        for m in model.modules()
    )
    cov = prepare_model(model, get_preset("dopq")).coverage
    assert cov.complete
    assert (cov.quantized["Linear"], cov.total["Linear"]) == (linears, linears)
    assert (cov.quantized["Conv2d"], cov.total["Conv2d"]) == (convs, convs)
    assert (cov.quantized["attention"], cov.total["attention"]) == (blocks, blocks)


def test_unknown_attention_is_refused_unless_partial_is_allowed() -> None:
    model = timm.create_model("test_vit", num_classes=10).eval()
    model.blocks[1].attn = _PlainAttention(model.embed_dim, model.blocks[0].attn.num_heads)
    with pytest.raises(ModelError, match=r"attention: blocks\.1\.attn \(_PlainAttention\).*--allow-partial"):
        prepare_model(copy.deepcopy(model), get_preset("dopq"))
    import dopq

    x = torch.randn(4, 3, 160, 160)
    qmodel, report = dopq.quantize_with_report(
        model, x, get_preset("dopq"), allow_partial=True, progress=False
    )
    cov = report.coverage
    assert cov.left_float == {"Linear": [], "Conv2d": [], "attention": ["blocks.1.attn (_PlainAttention)"]}
    blocks = len(model.blocks)
    assert (cov.quantized["attention"], cov.total["attention"]) == (blocks - 1, blocks)
    assert isinstance(model.blocks[1].attn.qkv, QuantLinear)  # its Linear layers are still quantized
    assert qmodel(x).shape == (4, 10)


_SMALL = dict(embed_dim=64, depth=2, num_heads=2, num_classes=10)
VIT_VARIANTS = [
    pytest.param("vit_base_patch16_224", dict(reg_tokens=4, class_token=False, global_pool="avg", img_size=64),
                 id="vit-registers-avgpool"),
    pytest.param("deit3_small_patch16_224", dict(img_size=64), id="deit3-layerscale"),
    pytest.param("vit_small_patch14_dinov2", dict(img_size=56), id="dinov2-patch14"),
    pytest.param("vit_base_patch16_clip_224", dict(img_size=64), id="clip-norm-pre"),
    pytest.param("beit_base_patch16_224", dict(img_size=64), id="beit-relative-position-bias"),
    pytest.param("eva02_tiny_patch14_224", dict(img_size=56), id="eva02-rope-swiglu-inner-norm"),
]  # fmt: skip


def _randomize(model: nn.Module) -> nn.Module:
    """Random weights everywhere (LayerScale, relative position tables and q/v biases start at or
    near zero in timm, which would make the FP comparison trivial)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


@pytest.mark.parametrize(("name", "kwargs"), VIT_VARIANTS)
def test_vit_variants_are_equivalent_and_quantize(name: str, kwargs: dict) -> None:
    """Registers without a class token (average pooling), LayerScale, patch 14, ``norm_pre`` (the
    VisionTransformer class), BEiT's relative position bias and EVA-02's rotary embeddings and
    SwiGLU MLP (whose inner LayerNorm -> fc2 is a pair): found structurally, FP-equivalent, fully
    quantized at W4/A4 with the re-parameterization preserving the float function."""
    import dopq

    model = _randomize(timm.create_model(name, **_SMALL, **kwargs).eval())
    x = torch.randn(4, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert scale > 0.1  # a model whose output depends on its blocks
    assert _max_fp_diff(copy.deepcopy(model), x) <= 1e-5
    linears, convs = _float_counts(model)
    ref = copy.deepcopy(model)
    qmodel, report = dopq.quantize_with_report(
        model, x, get_preset("dopq", w_bits=4, a_bits=4), progress=False
    )
    cov = report.coverage
    assert cov.complete and (cov.total["Linear"], cov.total["Conv2d"]) == (linears, convs)
    assert cov.quantized["attention"] == cov.total["attention"] == len(ref.blocks)
    assert report.reparam.max_logit_change <= 1e-4
    with torch.no_grad():
        y, y_ref = qmodel(x), ref(x)
    assert y.shape == y_ref.shape and torch.isfinite(y).all()


def test_swinv2_cosine_attention_post_norm_is_equivalent_and_quantizes() -> None:
    """Swin-V2: cosine attention with a learned logit scale and a continuous position bias, post-norm
    residuals (their LayerNorms are read by the residual too, so none is re-parameterized)."""
    import dopq

    kwargs = dict(embed_dim=32, depths=(1, 1), num_heads=(1, 2), img_size=64, window_size=8, num_classes=10)
    model = _randomize(timm.create_model("swinv2_tiny_window8_256", **kwargs).eval())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        scale = float(model(x).abs().max())
    assert scale > 0.1  # a model whose output depends on its blocks
    assert _max_fp_diff(copy.deepcopy(model), x) <= 1e-5
    qmodel, report = dopq.quantize_with_report(
        model, x, get_preset("dopq", w_bits=4, a_bits=4), progress=False
    )
    cov = report.coverage
    assert cov.complete and cov.quantized["attention"] == cov.total["attention"] == 2
    assert cov.quantized["LayerNorm re-parameterized"] == 0
    assert type(qmodel.layers[0].blocks[0].attn).__name__ == "QuantWindowAttentionV2"
    assert torch.isfinite(qmodel(x)).all()


def test_weight_and_activation_quantizers_are_told_apart_by_their_slot_not_their_name():
    """``set_quantization`` switches a layer's weight quantizer by the slot it sits in: during
    reconstruction the weight quantizer is wrapped in a learned rounding, its quantizer then named
    ``weight_quantizer.base``, and it is still a weight quantizer; a quantizer merely named like one
    elsewhere is not."""
    from dopq.modules import weight_quantizer_ids
    from dopq.quantizers import UniformQuantizer
    from dopq.quantizers.adaround import AdaRoundQuantizer

    torch.manual_seed(0)
    layer = QuantLinear(nn.Linear(8, 4), UniformQuantizer(4), UniformQuantizer(4, PerChannel(0)))
    layer.weight_quantizer.initialize(layer.weight.detach(), None)
    base = layer.weight_quantizer
    layer.weight_quantizer = AdaRoundQuantizer(base, layer.weight)
    model = nn.Sequential(layer)
    model.add_module("weight_quantizer", UniformQuantizer(4))  # an activation quantizer by its slot
    assert weight_quantizer_ids(model) == {id(base)}
    set_quantization(model, weights=False, activations=True)
    assert not base.enabled
    assert layer.input_quantizer.enabled and model.weight_quantizer.enabled
    set_quantization(model, weights=True, activations=False)
    assert base.enabled
    assert not layer.input_quantizer.enabled and not model.weight_quantizer.enabled


def test_layernorm_pairs_are_found_without_keeping_activations() -> None:
    """The structure trace reads the autograd graph and never runs a backward, so autograd saves no
    tensors for one: it had held every block's activations, attention maps included (about 7 GB for
    one 518-pixel image through a DINOv2-L)."""
    model = timm.create_model("test_vit", num_classes=10).eval()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        pairs = find_layernorm_pairs(model, torch.randn(1, 3, 160, 160))
    assert len(pairs) == 2 * len(model.blocks) and saved == []
