"""Value centring: exact in float on every attention form, v's mean on 0 afterwards, and a clear
error when a value path is wrong."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import dopq
from conftest import tiny_swin, tiny_vit
from dopq.centring import centre_values, fold_value_offset
from dopq.models import ValuePath, prepare_model, value_paths
from dopq.modules import quantizers_off


def _prepared(model: nn.Module, **overrides) -> nn.Module:
    model = copy.deepcopy(model)
    prepare_model(model, dopq.get_preset("recommended", w_bits=8, a_bits=8, **overrides))
    return model


def _v_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """v (heads concatenated, one row per token) as ``attn @ v`` of module ``name`` reads it."""
    seen = []

    def hook(module, args):
        v = args[1]  # (batch, heads, tokens, head_dim)
        seen.append(v.transpose(1, 2).reshape(-1, v.shape[1] * v.shape[3]))

    handle = model.get_submodule(name).matmul_av.register_forward_pre_hook(hook)
    with torch.no_grad(), quantizers_off(model):
        model(x)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_any_offset_folds_exactly(make) -> None:
    """attn @ (v - c) + c = attn @ v: a large random offset moved through the biases leaves the
    float logits as they were (float32 rounding only)."""
    model, x = make()
    with torch.no_grad():
        reference = model(x)
    prepared = _prepared(model)
    paths = value_paths(prepared)
    assert paths and all(p.consumer is prepared.get_submodule(n).proj for n, p in paths.items())
    for path in paths.values():
        channels = len(range(path.producer.out_features)[path.rows])
        fold_value_offset(path, 3.0 * torch.randn(channels))
    with torch.no_grad(), quantizers_off(prepared):
        assert torch.allclose(prepared(x), reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("make", [tiny_vit, tiny_swin], ids=["vit", "swin"])
def test_centring_puts_each_v_channel_mean_on_zero(make) -> None:
    model, x = make()
    prepared = _prepared(model)
    name = next(iter(value_paths(prepared)))
    before = _v_of(prepared, name, x)
    report = centre_values(prepared, x)
    after = _v_of(prepared, name, x)
    assert before.mean(0).abs().max() > 1e-2  # random biases: there was something to take out
    assert after.mean(0).abs().max() < 1e-5
    assert torch.allclose(after, before - before.mean(0), atol=1e-5)  # only the mean moved
    assert report.offsets[name] == pytest.approx(float(before.mean(0).abs().max()), rel=1e-4)
    assert report.max_logit_change < 1e-4


def test_a_norm_before_the_output_projection_has_no_value_path() -> None:
    """timm's ``scale_norm`` puts a LayerNorm between attn @ v and proj: a constant added to v would
    not come back through proj's bias, so that attention is left as it is."""
    model = timm.create_model("test_vit", num_classes=10, scale_attn_norm=True).eval()
    prepared = _prepared(model)
    assert value_paths(prepared) == {}
    assert centre_values(prepared, torch.randn(2, 3, 160, 160)).offsets == {}


def test_a_wrong_value_path_is_an_error_not_a_silent_change(monkeypatch) -> None:
    model, x = tiny_vit()
    prepared = _prepared(model)
    attention = type(prepared.get_submodule(next(iter(value_paths(prepared)))))

    def q_rows_instead(self) -> ValuePath:  # the q third: shifting it changes the attention map
        c = self.qkv.out_features // 3
        return ValuePath(self.qkv, slice(0, c), self.proj)

    monkeypatch.setattr(attention, "value_path", q_rows_instead)
    with pytest.raises(RuntimeError, match="value centring changed the float logits"):
        centre_values(prepared, x)


def test_quantize_centres_values_before_calibration() -> None:
    """The recipe switch runs the stage (timed, reported) before calibration: in the quantized model
    the v that ``attn @ v`` reads (float forward) has each channel's mean on 0, and v's grid is
    centred; without the switch the means stay where the biases put them."""
    model, x = tiny_vit()
    config = dopq.get_preset("recommended", w_bits=8, a_bits=8)
    quantized, report = dopq.quantize_with_report(copy.deepcopy(model), x, config, progress=False)
    assert report.centring is not None and report.centring.offsets
    assert "value_centring" in report.timings
    assert report.to_dict()["centring_max_logit_change"] < 1e-4
    plain = dopq.quantize(copy.deepcopy(model), x, config.replace(centre_values=False), progress=False)
    for name in value_paths(quantized):
        assert _v_of(quantized, name, x).mean(0).abs().max() < 1e-3
        assert _v_of(plain, name, x).mean(0).abs().max() > 1e-2
        assert float(quantized.get_submodule(name).matmul_av.quantizer_b.zero_point) == 128
    with torch.no_grad():
        assert torch.allclose(quantized(x).softmax(-1), plain(x).softmax(-1), atol=0.05)


def test_a_projection_without_bias_gets_one(tmp_path) -> None:
    """A ``qkv`` without bias (``qkv_bias=False``) receives the offset in a new bias, and the centred
    model saves and loads back to the same outputs."""
    from dopq.serialize import load_quantized, save_quantized

    model = timm.create_model("test_vit", num_classes=10, qkv_bias=False).eval()
    x = torch.randn(8, 3, 160, 160)
    config = dopq.get_preset("recommended", w_bits=8, a_bits=8)
    prepared = _prepared(model)
    centre_values(prepared, x)
    paths = value_paths(prepared)
    assert paths and all(p.producer.bias is not None for p in paths.values())
    for path in paths.values():  # only v's rows moved
        assert torch.equal(path.producer.bias[: path.rows.start], torch.zeros(path.rows.start))
        assert path.producer.bias[path.rows].abs().max() > 0
    quantized = dopq.quantize(copy.deepcopy(model), x, config, progress=False)
    loaded, _, _ = load_quantized(save_quantized(quantized, tmp_path / "q.pt", config))
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))


def test_attention_modules_it_cannot_centre_are_named_and_said(caplog: pytest.LogCaptureFixture) -> None:
    """A norm between attn @ v and the output projection (timm's scale_attn_norm) leaves no v to
    shift: the recommended preset's value centring at 8-bit activations did nothing there, without a
    word or a trace in the result."""
    torch.manual_seed(0)
    model = timm.create_model("test_vit", num_classes=10, scale_attn_norm=True).eval()
    config = dopq.get_preset("recommended", w_bits=8, a_bits=8)
    assert config.centre_values
    with caplog.at_level("WARNING", logger="dopq"):
        _, report = dopq.quantize_with_report(model, torch.randn(4, 3, 160, 160), config, progress=False)
    attentions = [f"blocks.{i}.attn" for i in range(len(model.blocks))]
    assert report.centring.offsets == {} and report.centring.skipped == attentions
    assert report.to_dict()["centring_skipped"] == attentions
    assert f"could not shift v in {len(attentions)} attention modules" in caplog.text
    torch.manual_seed(0)
    plain = timm.create_model("test_vit", num_classes=10).eval()
    _, report = dopq.quantize_with_report(plain, torch.randn(4, 3, 160, 160), config, progress=False)
    assert report.centring.skipped == [] and len(report.centring.offsets) == len(attentions)
