"""Recipes: validation, presets, JSON round trips."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from dopq.config import (
    TANQ_CENTERS,
    TANQ_CENTERS_WIDE,
    QuantConfig,
    ReconstructConfig,
    get_preset,
    list_presets,
)
from dopq.errors import ConfigError


@pytest.mark.parametrize("name", list_presets())
def test_presets_round_trip_through_json(name):
    cfg = get_preset(name, reconstruct=ReconstructConfig(calib_size=16, iters=3))
    again = QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_presets_differ_only_in_components():
    repq, dopq = get_preset("repq"), get_preset("dopq")
    components = ("softmax_quantizer", "ln_scale", "integer_zero_point", "ln_shift", "bias_correction")
    assert [getattr(repq, c) for c in components] == ["logsqrt2", "mean", False, "bias", False]
    assert [getattr(dopq, c) for c in components] == ["tanq", "median", True, "input", True]
    changes = {c: getattr(dopq, c) for c in components}
    assert repq.replace(**changes) == dopq


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("w_bits", 9, "w_bits must be an integer in 2..8"),
        ("a_bits", 1, "a_bits must be an integer in 2..8"),
        ("softmax_quantizer", "log10", "softmax_quantizer must be one of"),
        ("ln_scale", "max", "ln_scale must be one of"),
        ("ln_shift", "weights", "ln_shift must be one of bias, input"),
        ("symmetric_attention", True, "symmetric_attention must be one of off, qk, qkv"),
        ("percentiles", (0.2,), "percentiles"),
        ("act_percentiles", (), "act_percentiles must be in"),
        ("act_range_objective", "l1", "act_range_objective must be one of mse, output"),
    ],
)
def test_invalid_fields_raise_actionable_errors(field, value, message):
    with pytest.raises(ConfigError, match=message):
        QuantConfig(**{field: value})


def test_unknown_preset_and_fields():
    with pytest.raises(ConfigError, match="unknown method 'gptq'"):
        get_preset("gptq")
    with pytest.raises(ConfigError, match="unknown config fields: colour"):
        QuantConfig.from_dict({"colour": 1})


def test_reconstruct_defaults_follow_the_paper_family():
    r = ReconstructConfig()
    assert (r.calib_size, r.batch_size) == (1024, 64)
    assert (r.iters_for(3), r.iters_for(4), r.iters_for(6)) == (1000, 1000, 200)
    assert ReconstructConfig(iters=7).iters_for(3) == 7
    with pytest.raises(ConfigError):
        ReconstructConfig(drop_prob=2.0)
    with pytest.raises(ConfigError, match="grad_shards must be >= 1"):
        ReconstructConfig(grad_shards=0)
    assert ReconstructConfig(batch_size=4, grad_shards=4).grad_shards == 4


def test_reconstruct_learning_rates_follow_the_schedule():
    r = ReconstructConfig()
    # the same travel (lr x iters) for a short or a long schedule, within bounds
    assert r.lr_weight_for(1000) == pytest.approx(6e-3)
    assert r.lr_weight_for(60) == pytest.approx(0.1)
    assert (r.lr_weight_for(10), r.lr_weight_for(100_000)) == (0.1, 1e-3)  # clamped
    assert r.lr_act_for(60) == pytest.approx(1e-2) and r.lr_act_for(20_000) == pytest.approx(4e-5)
    assert r.lr_bias_for(1000) == pytest.approx(1.8e-3)
    assert ReconstructConfig(lr_weight=1e-4).lr_weight_for(60) == 1e-4
    assert ReconstructConfig(lr_act=1e-5, lr_bias=2e-5).lr_act_for(60) == 1e-5
    with pytest.raises(ConfigError, match="lr_bias"):
        ReconstructConfig(lr_bias=0.0)


def test_reconstruct_rounding_choices():
    assert ReconstructConfig().rounding == "ste"
    assert ReconstructConfig(rounding="adaround").rounding == "adaround"
    with pytest.raises(ConfigError, match="rounding"):
        ReconstructConfig(rounding="nearest")


def test_dopq_preset_uses_tanq_below_8_bits_and_uniform_at_8() -> None:
    assert [get_preset("dopq", a_bits=b).softmax_quantizer for b in (3, 4, 6, 7, 8)] == ["tanq"] * 4 + [
        "uniform"
    ]
    assert get_preset("dopq", a_bits=8, softmax_quantizer="tanq").softmax_quantizer == "tanq"
    assert get_preset("repq", a_bits=8).softmax_quantizer == "logsqrt2"


def test_act_percentiles_reach_the_activation_quantizers_only():
    import timm

    from dopq.models import prepare_model
    from dopq.modules import QuantLinear

    config = get_preset("dopq", act_percentiles=(0.99, 0.999))
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert get_preset("dopq").act_percentiles is None  # the presets keep one grid
    model = timm.create_model("test_vit", num_classes=10)
    prepare_model(model, config)
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert linears
    assert all(m.input_quantizer.percentiles == (0.99, 0.999) for m in linears)
    assert all(m.weight_quantizer.percentiles == config.percentiles for m in linears)


def test_recommended_preset_follows_the_width_by_rule() -> None:
    def components(w: int, a: int) -> tuple:
        c = get_preset("recommended", w_bits=w, a_bits=a)
        return (
            c.weight_rounding,
            c.gptq_target_used,
            c.softmax_quantizer,
            c.symmetric_weights,
            c.symmetric_attention,
            c.centre_values,
            c.gptq_damp,
            c.gptq_check,
        )

    assert components(8, 8) == ("nearest", "quantized", "uniform", True, "qkv", True, 0.1, False)
    assert components(4, 8) == ("gptq", "quantized", "uniform", False, "qkv", True, 1.0, False)
    # at W4/A4 GPTQ's rounding is kept only where the calibration images show it pays
    assert components(4, 4) == ("gptq", "quantized", "tanq", False, "off", False, 1.0, True)
    assert components(3, 3) == ("gptq", "float", "tanq", False, "off", False, 0.1, False)
    assert components(8, 3) == ("gptq", "float", "tanq", True, "off", False, 0.1, False)
    # where the rule does not apply it is dopq's config; at 3 bits only the rounding differs, with
    # 8-bit weights the centred weight grids, with 8-bit activations the centred, mean-centred q, k, v
    # (and at W4/A8 GPTQ's rounding with the strongest damping)
    assert get_preset("recommended", w_bits=6, a_bits=6) == get_preset("dopq", w_bits=6, a_bits=6)
    checked = dict(weight_rounding="nearest", gptq_damp=0.1, gptq_check=False)
    assert get_preset("recommended", w_bits=4, a_bits=4).replace(**checked) == get_preset(
        "dopq", w_bits=4, a_bits=4
    )
    # with 3-bit activations TanQ searches the wider centre grid as well
    dopq = get_preset("dopq", w_bits=3, a_bits=3)
    recommended3 = get_preset("recommended", w_bits=3, a_bits=3)
    assert recommended3.tanq_centers == TANQ_CENTERS_WIDE
    assert recommended3.replace(weight_rounding="nearest", tanq_centers=TANQ_CENTERS) == dopq
    assert get_preset("recommended", w_bits=3, a_bits=4).tanq_centers == TANQ_CENTERS
    dopq48 = get_preset("dopq", w_bits=4, a_bits=8)
    centred = dict(symmetric_attention="off", centre_values=False)
    gptq = dict(weight_rounding="nearest", gptq_damp=0.1)
    assert get_preset("recommended", w_bits=4, a_bits=8).replace(**centred, **gptq) == dopq48
    dopq8 = get_preset("dopq", w_bits=8, a_bits=8)
    recommended8 = get_preset("recommended", w_bits=8, a_bits=8)
    assert recommended8.replace(symmetric_weights=False, **centred) == dopq8
    # anything given explicitly wins over the rule
    given = get_preset("recommended", w_bits=3, a_bits=3, weight_rounding="nearest", tanq_centers=(0.5,))
    assert (given.weight_rounding, given.tanq_centers) == ("nearest", (0.5,))
    assert "recommended" in list_presets()
    with pytest.raises(ConfigError, match=r"w_bits must be an integer in 2\.\.8"):
        get_preset("recommended", w_bits=1)


def test_tanq_centers_are_validated_and_reach_every_tanq_search() -> None:
    import timm

    from dopq.models import prepare_model
    from dopq.quantizers.auto import AutoLevelQuantizer
    from dopq.quantizers.tanq import TanQQuantizer

    for bad in ((), (0.0, 0.5), (1.0,)):
        with pytest.raises(ConfigError, match="tanq_centers must be in"):
            QuantConfig(tanq_centers=bad)
    assert get_preset("recommended").tanq_centers == (0.35, 0.5)  # the wide grid is for 3-bit activations
    for softmax in ("tanq", "auto"):
        config = get_preset("recommended", softmax_quantizer=softmax, tanq_centers=(0.35, 0.9))
        model = timm.create_model("test_vit", num_classes=10)
        prepare_model(model, config)
        tanqs = [m for m in model.modules() if isinstance(m, TanQQuantizer)]
        assert tanqs and all(q.grid[1] == config.tanq_centers for q in tanqs)
        autos = [m for m in model.modules() if isinstance(m, AutoLevelQuantizer)]
        assert len(autos) == (len(tanqs) if softmax == "auto" else 0)


def test_softmax_grid_bits_are_validated_and_reach_every_tanq() -> None:
    import timm

    from dopq.models import prepare_model
    from dopq.quantizers.tanq import TanQQuantizer

    for bad in (4, 7, 21):
        with pytest.raises(ConfigError, match=r"softmax_grid_bits must be in 8\.\.20"):
            QuantConfig(softmax_grid_bits=bad)
    for preset in ("dopq", "recommended"):
        assert get_preset(preset).softmax_grid_bits == 16  # the fast export is the default
    for softmax, grid in (("tanq", None), ("auto", 12)):
        model = timm.create_model("test_vit", num_classes=10)
        prepare_model(model, get_preset("dopq", softmax_quantizer=softmax).replace(softmax_grid_bits=grid))
        tanqs = [m for m in model.modules() if isinstance(m, TanQQuantizer)]
        assert tanqs and all(q.grid_bits == grid for q in tanqs)


def test_a_threshold_grid_too_coarse_for_tanq_is_recorded_and_said(caplog: pytest.LogCaptureFixture) -> None:
    """A grid too coarse for a TanQ table leaves that table's exact midpoints (the fast export's table
    read is not used there): ``--softmax-grid-bits 8`` did nothing on timm's random test_vit at 4 bits,
    without a word or a trace in the result."""
    import timm

    import dopq

    torch.manual_seed(0)
    model, images = timm.create_model("test_vit", num_classes=10).eval(), torch.randn(6, 3, 160, 160)
    _, fine = dopq.quantize_with_report(copy.deepcopy(model), images, get_preset("dopq"), progress=False)
    assert fine.coverage.softmax_off_grid == []
    assert fine.to_dict()["coverage"]["softmax_off_grid"] == []
    coarse_config = get_preset("dopq", softmax_grid_bits=8)
    with caplog.at_level("WARNING", logger="dopq"):
        _, coarse = dopq.quantize_with_report(copy.deepcopy(model), images, coarse_config, progress=False)
    off = coarse.to_dict()["coverage"]["softmax_off_grid"]
    assert off and set(off) <= set(coarse.coverage.softmax_kinds)
    assert "(6 off the threshold grid: exact midpoints)" in coarse.coverage.summary()
    assert "softmax_grid_bits 8 (--softmax-grid-bits) is too coarse" in caplog.text


@pytest.mark.parametrize("family", ["vit", "deit-distilled", "swin", "hf-vit", "hf-swin"])
def test_edge_w_bits_reach_the_patch_embedding_and_head_only(family: str) -> None:
    import timm
    import torch

    from conftest import tiny_swin
    from dopq.models import prepare_model
    from dopq.modules import QuantConv2d, QuantLinear
    from test_hf import tiny, wrap_hf_model

    with pytest.raises(ConfigError, match=r"edge_w_bits must be an integer in 2\.\.8"):
        QuantConfig(edge_w_bits=9)
    assert get_preset("dopq").edge_w_bits is None
    config = get_preset("dopq", w_bits=3, a_bits=3, edge_w_bits=8)
    assert QuantConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    models = {
        "vit": lambda: timm.create_model("test_vit", num_classes=10),
        "deit-distilled": lambda: timm.create_model(
            "deit_tiny_distilled_patch16_224", img_size=32, depth=2, num_classes=10
        ),
        "swin": lambda: tiny_swin()[0],
        "hf-vit": lambda: wrap_hf_model(tiny("vit")),
        "hf-swin": lambda: wrap_hf_model(tiny("swin")),
    }
    model = models[family]().eval()
    # the layers outside the transformer blocks, found from the float model's structure
    blocks = [
        m
        for m in model.modules()
        if type(m).__name__ in ("Block", "SwinTransformerBlock", "ViTLayer", "SwinLayer")
    ]
    inside = {id(m) for b in blocks for m in b.modules()}
    expected = {
        n for n, m in model.named_modules()
        if type(m) in (torch.nn.Linear, torch.nn.Conv2d) and id(m) not in inside and "downsample" not in n
    }  # fmt: skip
    prepare_model(model, config)
    bits = {
        n: m.weight_quantizer.bits
        for n, m in model.named_modules()
        if isinstance(m, (QuantLinear, QuantConv2d))
    }
    edges = {n for n, b in bits.items() if b == 8}
    assert edges == expected
    assert any(isinstance(model.get_submodule(n), QuantConv2d) for n in edges)  # the patch embedding
    assert sum(isinstance(model.get_submodule(n), QuantLinear) for n in edges) == (
        2 if "distilled" in family else 1
    )
    assert set(bits.values()) == {3, 8}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bias_correction": "off"}, "bias_correction must be bool, got 'off'"),  # ran with bias correction
        ({"integer_zero_point": 0}, "integer_zero_point must be bool, got 0"),
        ({"gptq_damp": None}, "gptq_damp must be float, got None"),
        ({"gptq_damp": "0.1"}, "gptq_damp must be float, got '0.1'"),
        ({"gptq_target_shrink": float("nan")}, "gptq_target_shrink must be float, got nan"),
        ({"softmax_grid_bits": 12.5}, "softmax_grid_bits must be int | None, got 12.5"),
        ({"w_bits": True}, "w_bits must be int, got True"),
        ({"reconstruct": True}, "reconstruct must be dopq.config.ReconstructConfig | None, got True"),
        ({"reconstruct": {"itrs": 3}}, "unknown reconstruct fields: itrs"),
        ({"reconstruct": {"iters": 2.5}}, "iters must be int | None, got 2.5"),
        ({"reconstruct": {"lr_weight": float("nan")}}, "lr_weight must be float | None, got nan"),
        ({"reconstruct": {"learn_bias": "no"}}, "learn_bias must be bool, got 'no'"),
    ],
)
def test_fields_of_the_wrong_type_are_refused(fields, message):
    """Configs read from JSON or YAML: a string "off" was stored and ran as on."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        QuantConfig.from_dict(fields)


def test_unknown_override_names_are_one_config_error():
    import dopq

    with pytest.raises(ConfigError, match="unknown config fields: foo"):
        get_preset("dopq", foo=1)
    with pytest.raises(ConfigError, match="unknown config fields: foo"):
        get_preset("dopq").replace(foo=1)
    with pytest.raises(ConfigError, match="config must be a QuantConfig, a preset name or None, got int"):
        dopq.quantize(torch.nn.Linear(2, 2), torch.zeros(1, 3, 8, 8), 42)


def test_a_none_override_sets_a_field_that_takes_none() -> None:
    """get_preset dropped every None as 'not given': softmax_grid_bits=None (the exact TanQ
    midpoints) silently stayed 16. None still leaves a field that cannot be None to the recipe."""
    assert get_preset("dopq", softmax_grid_bits=None).softmax_grid_bits is None
    config = get_preset("recommended", w_bits=None, a_bits=3, tanq_centers=None, edge_w_bits=None)
    assert config.w_bits == 4 and config.tanq_centers == TANQ_CENTERS_WIDE and config.edge_w_bits is None


def test_a_config_that_is_not_a_dict_or_changed_after_construction_is_refused() -> None:
    """from_dict of a JSON list raised a TypeError from the field check; a field assigned after
    construction reached the quantizers unchecked ('<=' not supported between 'int' and 'str')."""
    import dopq

    with pytest.raises(ConfigError, match="config must be a dict of field names and values, got list"):
        QuantConfig.from_dict([1])
    config = get_preset("repq")
    config.w_bits = "4"
    with pytest.raises(ConfigError, match="w_bits must be int, got '4'"):
        dopq.quantize(torch.nn.Linear(2, 2), torch.zeros(1, 3, 8, 8), config)
    config = get_preset("repq", reconstruct=ReconstructConfig(iters=2))
    config.reconstruct.iters = -1
    with pytest.raises(ConfigError, match="recon iters must be >= 0, got -1"):
        config.checked()
    assert get_preset("dopq").checked() == get_preset("dopq")
