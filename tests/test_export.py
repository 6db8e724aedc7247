"""ONNX export: codes equal to the simulated ones, onnxruntime outputs against the simulation, integer
kernels in the graph onnxruntime runs, compact saving, and one-line errors for bad input."""

from __future__ import annotations

import copy
import io
import json
import math
import shutil
import sys
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import dopq
from conftest import CIFAR, require, runner_refuses_bad_arguments, small_onnx
from conftest import tiny_swin as _swin
from conftest import tiny_vit as _vit
from dopq.cli import main
from dopq.environment import file_sha256
from dopq.errors import ExportError
from dopq.export import INTEGER_OPS, OnnxModel, export_onnx, optimized_op_counts, read_metadata, to_deploy
from dopq.export.float64_gelu import GELU_ARGMIN, boundary_pre_images, exact_float64_gelu
from dopq.export.linear import BIAS_CODE_LIMIT, DeployLinear, _bias_codes
from dopq.export.matmul import SoftmaxLevels
from dopq.export.runtime import inexact_here, onnx_metadata, optimized_graph
from dopq.export.symbolic import integer_linear, qdq, quantize_codes
from dopq.modules import QuantConv2d, QuantLinear, QuantMatMul, float64_copy
from dopq.quantizers import LevelQuantizer, PerTensor, UniformQuantizer, build_quantizer
from dopq.serialize import load_quantized, pack_codes, save_quantized, unpack_codes


def _export_module(module: nn.Module, x: torch.Tensor, path: Path, **export_kw) -> np.ndarray:
    """Export a small module with the TorchScript exporter and run it with onnxruntime."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            module, (x,), str(path), dynamo=False, opset_version=21, input_names=["x"], **export_kw
        )
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


class _Wrap(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


@pytest.mark.parametrize("clip_codes", [False, True], ids=["float-clip", "code-clip"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_exported_activation_codes_equal_the_simulated_ones(
    bits: int, clip_codes: bool, tmp_path: Path
) -> None:
    q = UniformQuantizer(bits, PerTensor())
    q.observing = True
    x = torch.randn(4096) * 3 + 0.5
    simulated = q(x)
    scale, zero_point = float(q.scale), int(q.zero_point)
    out = _export_module(_Wrap(lambda t: qdq(t, scale, zero_point, bits, clip_codes)), x, tmp_path / "q.onnx")
    assert torch.equal(torch.from_numpy(out), simulated)
    # 0.0 is a level and the zero point a code of the b-bit range
    assert 0 <= int(q.zero_point) <= 2**bits - 1
    assert float(q(torch.zeros(1))) == 0.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_integer_linear_sees_the_simulated_codes(bits: int, tmp_path: Path) -> None:
    """The contrib MatMulIntegerToFloat's input codes (uint8 codes clipped to the b-bit range) are
    the simulated ones: through an identity weight with scale 1 the output is ``qdq(x)`` exactly."""
    q = UniformQuantizer(bits, PerTensor())
    q.observing = True
    x = torch.randn(512, 8) * 3 + 0.5
    simulated = q(x)
    scale, zero_point = float(q.scale), int(q.zero_point)
    eye, ones, zeros = torch.eye(8, dtype=torch.int8), torch.ones(8), torch.zeros(8, dtype=torch.int8)
    linear = _Wrap(lambda t: integer_linear(t, scale, zero_point, bits, eye, ones, zeros, torch.zeros(8)))
    assert torch.equal(linear(x), simulated)
    path = tmp_path / "l.onnx"
    out = _export_module(linear, x, path, custom_opsets={"com.microsoft": 1})
    assert {n.op_type for n in onnx.load(str(path)).graph.node} >= {"MatMulIntegerToFloat", "QuantizeLinear"}
    assert torch.equal(torch.from_numpy(out), simulated)


def _calibrated_softmax_quantizer(
    name: str, bits: int, grid_bits: int | None = None
) -> tuple[LevelQuantizer, torch.Tensor]:
    # "tanq-m0.9": TanQ at the wide grid's top centre (levels crowded near 0)
    kwargs = {"objective": "mse", "centers": (0.9,)} if name == "tanq-m0.9" else {}
    kwargs = {"objective": "mse"} if name == "tanq" else kwargs
    if grid_bits is not None:
        kwargs["grid_bits"] = grid_bits
    q = build_quantizer(name.removesuffix("-m0.9"), bits, **kwargs)
    q.observing = True
    attn = torch.softmax(torch.randn(4, 3, 64, 64) * 4, dim=-1)
    q(attn)
    q.observing = False
    return q, attn


@pytest.mark.parametrize(
    ("name", "bits"),
    [
        ("tanq", 2),
        ("tanq", 3),
        ("tanq", 4),
        ("tanq", 6),
        ("tanq-m0.9", 3),
        ("tanq-m0.9", 4),
        ("log2", 4),
        ("logsqrt2", 3),
    ],
)
def test_exported_softmax_codes_are_the_simulated_ones_at_every_threshold(
    name: str, bits: int, tmp_path: Path
) -> None:
    q, attn = _calibrated_softmax_quantizer(name, bits)
    points = q.decision_points()
    levels = q.lookup_table()
    up, down = torch.tensor(float("inf")), torch.tensor(0.0)
    # every decision point, the float either side, every level and real attention values
    x = torch.cat([points, points.nextafter(up), points.nextafter(down), levels, attn.reshape(-1)])
    simulated = q(x)
    out = torch.from_numpy(_export_module(SoftmaxLevels(q), x, tmp_path / "s.onnx"))
    assert torch.equal(out, simulated)  # the table's level of the simulation's code, bit for bit
    assert len(points) == len(levels) - 1
    graph = onnx.load(str(tmp_path / "s.onnx")).graph
    assert not {n.op_type for n in graph.node} & {"Tan", "Atan", "Log", "Exp"}


@pytest.mark.parametrize(
    ("name", "bits"), [("tanq", 2), ("tanq", 3), ("tanq", 4), ("tanq", 6), ("tanq-m0.9", 4)]
)
def test_grid_softmax_codes_are_one_table_read_and_the_simulated_ones(
    name: str, bits: int, tmp_path: Path
) -> None:
    """TanQ's thresholds on the 2^-16 grid: onnxruntime reads each level from the table of its grid
    cell (Mul, Cast, GatherElements), equal to the simulation at every cell edge, at every decision
    point and the floats either side, at every level and on real attention; OpenVINO keeps the
    counted form, which it fuses, up to 4 bits (faster there, slower above)."""
    q, attn = _calibrated_softmax_quantizer(name, bits, grid_bits=16)
    grid, cells = q.code_grid()
    assert grid == 16 and len(cells) == 2**16 + 1
    edges = torch.arange(2**16 + 1, dtype=torch.float32) / 2**16
    points = q.decision_points()
    up, down = torch.tensor(float("inf")), torch.tensor(0.0)
    x = torch.cat([edges, edges.nextafter(down), points, points.nextafter(up), points.nextafter(down)])
    x = torch.cat([x, q.lookup_table(), attn.reshape(-1)])
    form = SoftmaxLevels(q, "onnxruntime")
    assert form.kind == "indexed"
    out = torch.from_numpy(_export_module(form, x, tmp_path / "s.onnx"))
    assert torch.equal(out, q(x)) and torch.equal(form(x), q(x))
    ops = {n.op_type for n in onnx.load(str(tmp_path / "s.onnx")).graph.node}
    assert "GatherElements" in ops and not ops & {"Greater", "Tan", "Atan", "Log", "Exp"}
    assert SoftmaxLevels(q, "openvino").kind == ("counted" if bits <= 4 else "indexed")


def _tables_read_back(report, model: nn.Module) -> list[tuple[np.ndarray, torch.Tensor]]:
    """(the table each GatherElements reads once onnxruntime has folded the file's constants, the
    quantizer's own cell table), per attention."""
    folded = optimized_graph(report.path).graph
    folded_inits = {i.name: numpy_helper.to_array(i) for i in folded.initializer}
    reads = [n for n in folded.node if n.op_type == "GatherElements"]
    quantizers = [m.quantizer_a for m in model.modules() if isinstance(m, QuantMatMul)]
    tables = [q.lookup_table().float()[q.code_grid()[1]] for q in quantizers if isinstance(q, LevelQuantizer)]
    assert len(reads) == len(tables) > 0 and all(n.input[0] in folded_inits for n in reads)
    return [(folded_inits[n.input[0]], table) for n, table in zip(reads, tables, strict=True)]


@pytest.mark.parametrize("opset", [21, 13])
def test_softmax_cell_tables_are_stored_as_their_steps_and_folded_at_load(opset: int, tmp_path: Path) -> None:
    """Each attention's 2^16 + 1 cell levels are stored as the table's 2^b levels and the 2^b - 1 cells
    where its code steps up, so a 4-bit model's file holds neither a float table nor a code per cell
    per attention: onnxruntime folds ``Range -> Greater -> ReduceSum -> Gather`` into the
    quantizer's own cell table when it loads (one table read per element, as before)."""
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=4, a_bits=4), progress=False)
    report = export_onnx(model, tmp_path / "m.onnx", opset=opset)
    graph = onnx.load(report.path).graph
    assert not [i.name for i in graph.initializer if np.prod(i.dims) == 2**16 + 1]  # nothing per cell
    assert not [
        i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT and np.prod(i.dims) > 2**16
    ]
    steps = [i for i in graph.initializer if i.name.endswith("_steps")]
    assert steps and all(i.data_type == onnx.TensorProto.INT32 and list(i.dims) == [15] for i in steps)
    for stored, table in _tables_read_back(report, model):
        assert torch.equal(torch.from_numpy(stored.copy()), table)


def test_openvino_folds_the_cell_tables_above_4_bits(tmp_path: Path) -> None:
    """OpenVINO reads post-Softmax levels from the cell table above 4 bits; it folds the table's
    construction when it compiles (no Range, comparison or ReduceSum layer runs) and the file computes
    the simulation's function."""
    pytest.importorskip("openvino")
    from dopq.export.openvino_runtime import OpenVinoModel, openvino_layers

    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("recommended", w_bits=6, a_bits=6), progress=False)
    report = export_onnx(model, tmp_path / "m.onnx", target="openvino")
    ops = {n.op_type for n in onnx.load(report.path).graph.node}
    assert {"GatherElements", "Range", "ReduceSum"} <= ops and not ops & {"Tan", "Atan"}
    kinds = {kind for kind, _, _ in openvino_layers(report.path)}
    assert not kinds & {"Range", "ReduceSum", "GreaterEqual", "Greater"}, kinds
    with torch.no_grad():
        simulated = model(x)
    _assert_same_function(OpenVinoModel(report.path, threads=1)(x), simulated, 0.05)


@pytest.mark.parametrize(
    ("opset", "code_type"),
    [(21, onnx.TensorProto.UINT4), (17, onnx.TensorProto.UINT8)],
    ids=["opset21", "opset17"],
)
def test_a_table_read_twice_is_stored_once_and_one_of_many_values_stays_float(
    opset: int, code_type: int, tmp_path: Path
) -> None:
    """A monotone table (read by two modules) is stored once, as its steps; a table that is not
    monotone as one code per cell (UINT4 from opset 21, else uint8); a table of as many values as
    cells stays as it is."""
    from onnx import helper

    from dopq.export.onnx_export import _factor_level_tables

    levels = np.array([0.0, 0.01, 0.2, 0.7], np.float32)
    shared = levels[np.arange(4097) * 4 // 4097]  # 4 levels over 4097 cells, rising
    shuffled = levels[np.arange(4097) * 7 % 4]  # 4 levels, not monotone
    spread = np.linspace(0, 1, 4097, dtype=np.float32)  # every cell its own value: stays as it is
    x = helper.make_tensor_value_info("x", onnx.TensorProto.INT64, [8])
    names = (("t", "a"), ("t", "b"), ("s", "c"), ("u", "d"))
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, [8]) for _, o in names]
    tables = [numpy_helper.from_array(a, n) for a, n in ((shared, "t"), (spread, "s"), (shuffled, "u"))]
    graph = helper.make_graph(
        [helper.make_node("GatherElements", [t, "x"], [o], axis=0) for t, o in names],
        "tables",
        [x],
        outs,
        tables,
    )
    # IR version 10, as torch writes it (onnx 1.19 defaults to 12, which onnxruntime 1.23 cannot read)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)
    _factor_level_tables(model, opset)
    onnx.checker.check_model(model)
    stored = {i.name: (i.data_type, list(i.dims)) for i in model.graph.initializer}
    assert stored["t_steps"] == (onnx.TensorProto.INT32, [3]) and stored["s"][0] == onnx.TensorProto.FLOAT
    assert stored["u_codes"] == (code_type, [4097]) and "t_codes" not in stored
    assert sum(n.op_type == "Range" for n in model.graph.node) == 1
    onnx.save(model, str(tmp_path / "t.onnx"))
    idx = np.array([0, 1, 1024, 1025, 2048, 3000, 4095, 4096])
    a, b, c, d = OnnxModel(tmp_path / "t.onnx").session.run(None, {"x": idx})
    assert np.array_equal(a, shared[idx]) and np.array_equal(b, shared[idx])
    assert np.array_equal(c, spread[idx]) and np.array_equal(d, shuffled[idx])


@pytest.mark.parametrize(("bits", "kind"), [(4, "counted"), (6, "indexed"), (7, "indexed")])
def test_openvino_runs_the_post_softmax_codes_exactly(bits: int, kind: str, tmp_path: Path) -> None:
    """OpenVINO's form of TanQ (grid thresholds, the default) at every width it is used at: counted
    up to 4 bits, the cell-table read above (at 7 bits the table had been the Tan/Atan closed form,
    slow and off the simulated code on about 0.5 % of a map's elements); bit for bit the simulation's
    level at every cell edge, decision point and the floats either side, and on real attention."""
    pytest.importorskip("openvino")
    from dopq.export.openvino_runtime import compile_model

    q, attn = _calibrated_softmax_quantizer("tanq", bits, grid_bits=16)
    form = SoftmaxLevels(q, "openvino")
    assert form.kind == kind
    edges = torch.arange(2**16 + 1, dtype=torch.float32) / 2**16
    points = q.decision_points()
    up, down = torch.tensor(float("inf")), torch.tensor(0.0)
    x = torch.cat([edges, edges.nextafter(down), points, points.nextafter(up), points.nextafter(down)])
    x = torch.cat([x, q.lookup_table(), attn.reshape(-1)]).reshape(1, -1)
    _export_module(form, x, tmp_path / "s.onnx")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "s.onnx")).graph.node}
    assert not ops & {"Tan", "Atan", "Log", "Exp"}
    compiled = compile_model(tmp_path / "s.onnx", threads=1)  # f32 inference precision, as deployed
    assert torch.equal(torch.from_numpy(compiled({0: x.numpy()})[0]), q(x))


@pytest.mark.parametrize("target", ["onnxruntime", "openvino"])
def test_exported_weight_codes_are_the_quantizer_codes(target: str, tmp_path: Path) -> None:
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=4, a_bits=4), progress=False)
    report = export_onnx(model, tmp_path / "m.onnx", target=target)
    assert report.weight_storage == "int4"
    graph = onnx.load(report.path).graph
    inits = {i.name: i for i in graph.initializer}
    layer: QuantLinear = model.blocks[0].mlp.fc1
    codes = layer.weight_quantizer.codes(layer.weight)  # (out, in) in [0, 15]
    zero_point = layer.weight_quantizer.zero_point.long()
    centred = codes - zero_point[:, None]
    stored = numpy_helper.to_array(inits["blocks.0.mlp.fc1.weight.codes_int4"]).astype(np.int64)
    assert inits["blocks.0.mlp.fc1.weight.codes_int4"].data_type == onnx.TensorProto.INT4
    if target == "onnxruntime":
        # stored transposed (in, out); code - zero point is the same integer either way
        stored_zp = numpy_helper.to_array(inits["blocks.0.mlp.fc1.weight.zero_point_int4"]).astype(np.int64)
        assert torch.equal(torch.from_numpy(stored - stored_zp).t(), centred)
        return
    # stored transposed (in, out) as q - z + c with the shift c per channel (INT4 too), centred by an
    # int8 Sub of the two constants before a DequantizeLinear without zero points (OpenVINO folds it)
    (sub,) = [n for n in graph.node if n.op_type == "Sub" and "blocks.0.mlp.fc1" in n.output[0]]
    shift_name = sub.input[1].removesuffix("_as_int8") + "_int4"
    assert inits[shift_name].data_type == onnx.TensorProto.INT4
    shift = torch.from_numpy(numpy_helper.to_array(inits[shift_name]).astype(np.int64)).reshape(-1)
    assert torch.equal(torch.from_numpy(stored).t() - shift[:, None], centred)
    (dequantize,) = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] == sub.output[0]]
    assert len(dequantize.input) == 2
    fits = (centred.min(1).values >= -8) & (centred.max(1).values <= 7)
    assert fits.any() and not fits.all() and (shift[fits] == 0).all()  # the smallest shift: 0 where it fits


def _ops_and_agreement(
    model: nn.Module, x: torch.Tensor, path: Path, **kw
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    report = export_onnx(model, path, **kw)
    with torch.no_grad():
        simulated = model(x)
    runtime = OnnxModel(report.path, threads=1)(x)
    return dict(optimized_op_counts(report.path)), simulated, runtime


def _beit() -> tuple[nn.Module, torch.Tensor]:
    model = timm.create_model(
        "beit_base_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=10
    )
    with torch.no_grad():  # timm starts the relative position tables and q/v biases at zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), torch.randn(8, 3, 64, 64)


def _eva02() -> tuple[nn.Module, torch.Tensor]:
    model = timm.create_model(
        "eva02_tiny_patch14_224", img_size=56, embed_dim=64, depth=2, num_heads=2, num_classes=10
    )
    return model.eval(), torch.randn(8, 3, 56, 56)


def _swinv2() -> tuple[nn.Module, torch.Tensor]:
    kwargs = dict(embed_dim=32, depths=(1, 1), num_heads=(1, 2), img_size=64, window_size=8, num_classes=10)
    return timm.create_model("swinv2_tiny_window8_256", **kwargs).eval(), torch.randn(8, 3, 64, 64)


CASES = [
    pytest.param(_vit, 8, "tanq", id="vit-w8a8-tanq"),
    pytest.param(_vit, 4, "tanq", id="vit-w4a4-tanq"),
    pytest.param(_vit, 3, "tanq", id="vit-w3a3-tanq"),
    pytest.param(_vit, 3, "logsqrt2", id="vit-w3a3-logsqrt2"),
    pytest.param(_swin, 8, "tanq", id="swin-w8a8-tanq"),
    pytest.param(_swin, 4, "tanq", id="swin-w4a4-tanq"),
    pytest.param(_swin, 3, "logsqrt2", id="swin-w3a3-logsqrt2"),
    pytest.param(_beit, 4, "tanq", id="beit-w4a4-tanq"),
    pytest.param(_swinv2, 8, "tanq", id="swinv2-w8a8-tanq"),
    pytest.param(_eva02, 4, "tanq", id="eva02-w4a4-tanq"),
]


def _assert_same_function(result: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    """``result`` computes ``reference``'s function: most images' logits within ``tolerance`` of the
    logit range (at most half may differ) and most predictions the same. Two float32 computations
    of a 4-bit network round a value across a rounding boundary now and then (a different CPU,
    summation order or kernel), which moves that image's logits by a few per cent (docs/export.md,
    "Agreement with the simulation"); an error in the function moves every image. The function
    itself is checked module by module (``_assert_deploy_modules_compute_the_simulated_ones``)."""
    scale = float(reference.abs().max())
    per_image = (result - reference).abs().flatten(1).amax(1)
    assert int((per_image > tolerance * scale).sum()) <= len(per_image) // 2, per_image / scale
    assert (result.argmax(1) == reference.argmax(1)).float().mean() >= 0.75


@pytest.mark.parametrize(("make", "bits", "softmax"), CASES)
def test_onnxruntime_runs_integer_kernels_and_matches_the_simulation(
    make, bits, softmax, tmp_path: Path
) -> None:
    model, x = make()
    config = dopq.get_preset("dopq", w_bits=bits, a_bits=bits, softmax_quantizer=softmax)
    dopq.quantize(model, x, config, progress=False)
    ops, simulated, runtime = _ops_and_agreement(model, x, tmp_path / "m.onnx")
    linears = sum(isinstance(m, QuantLinear) for m in model.modules())
    matmuls = sum(isinstance(m, QuantMatMul) for m in model.modules())
    integer = sum(n for op, n in ops.items() if op in INTEGER_OPS)
    # every token-wise Linear (all but the head) and every q @ k^T runs on integer codes
    assert integer >= linears - 1 + matmuls // 2, ops
    assert ops.get("MatMul", 0) == matmuls // 2  # attn @ v: float levels times dequantized v
    if bits <= 6:  # post-Softmax codes counted: no transcendental op left in what onnxruntime runs
        assert not {"Tan", "Atan", "Log", "Exp"} & set(ops), ops
    if softmax == "tanq" and bits < 8:  # thresholds on the 2^-16 grid: one table read per element
        assert ops.get("GatherElements", 0) == matmuls // 2 and "Greater" not in ops, ops
    _assert_same_function(runtime, simulated, 0.05)


@pytest.mark.parametrize("method", ["dopq", "recommended"])
def test_a_weight_row_of_one_sign_exports(method: str, tmp_path: Path) -> None:
    """A Linear output channel whose weights are all positive (or all negative) still gets a zero
    point among the codes, so the export can store it (it was refused: zero point -15 at W4)."""
    model, x = _vit()
    with torch.no_grad():  # rows far from 0: all of a row's range on one side
        fc1, qkv = model.blocks[0].mlp.fc1.weight, model.blocks[0].attn.qkv.weight
        fc1[:2] = fc1[:2].abs() + fc1.abs().max()
        qkv[5] = -qkv[5].abs() - qkv.abs().max()
    dopq.quantize(model, x, dopq.get_preset(method, w_bits=4, a_bits=4), progress=False)
    for layer in (model.blocks[0].mlp.fc1, model.blocks[0].attn.qkv):
        lo, hi = layer.weight_quantizer.code_range
        assert (
            lo
            <= float(layer.weight_quantizer.zero_point.min())
            <= float(layer.weight_quantizer.zero_point.max())
            <= hi
        )
    _, simulated, runtime = _ops_and_agreement(model, x, tmp_path / "m.onnx")
    _assert_same_function(runtime, simulated, 0.05)


def test_shifted_window_mask_is_not_folded_into_a_per_window_bias(tmp_path: Path) -> None:
    """The shift mask (windows, n, n) and the position bias (1, heads, n, n) stay two constants:
    their sum folded per window and head, (1, windows, heads, n, n), made 3.3 MB of Swin-Tiny's
    20 MB W4/A8 file."""
    model = timm.create_model(  # 16 x 16 tokens, 4 windows of 8 x 8, the second block shifted
        "swin_tiny_patch4_window7_224", img_size=64, window_size=8, depths=(2,), num_heads=(2,), embed_dim=32
    ).eval()
    x = torch.randn(4, 3, 64, 64)
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=4, a_bits=8), progress=False)
    report = export_onnx(model, tmp_path / "m.onnx")
    graph = onnx.load(str(report.path)).graph
    constants = [
        *graph.initializer,
        *(a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute),
    ]
    tables = [tuple(t.dims) for t in constants if list(t.dims[-2:]) == [64, 64]]
    assert (4, 1, 64, 64) in tables and (1, 2, 64, 64) in tables, tables  # the mask, the position bias
    assert all(int(np.prod(dims)) <= 4 * 64 * 64 for dims in tables), tables
    with torch.no_grad():
        simulated = model(x)
    _assert_same_function(OnnxModel(report.path, threads=1)(x), simulated, 0.05)


def test_integer_attention_makes_attn_v_integer_too(tmp_path: Path) -> None:
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=4, a_bits=4), progress=False)
    ops, _simulated, runtime = _ops_and_agreement(model, x, tmp_path / "m.onnx", integer_levels=True)
    assert ops.get("MatMul", 0) == 0, ops
    with torch.no_grad():
        deployed = to_deploy(model, integer_levels=True)(x)
    # the graph computes the deploy form (checked without onnxruntime's fusions, which round
    # differently); the fixed-point levels move the result a little away from the simulation
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(str(tmp_path / "m.onnx"), options, providers=["CPUExecutionProvider"])
    unfused = torch.from_numpy(plain.run(None, {"images": x.numpy()})[0])
    _assert_same_function(deployed, unfused, 1e-5)
    _assert_same_function(runtime, deployed, 0.05)


def _assert_deploy_modules_compute_the_simulated_ones(model: nn.Module, x: torch.Tensor, **kw) -> None:
    """Every deploy module, given the inputs its quantized module saw in the simulation, computes
    the same output. Module by module, so that a code flipped by float rounding upstream (which
    moves the logits of a 4-bit network now and then, differently on each CPU) cannot hide or fake
    a difference in the function itself."""
    quantized = (QuantLinear, QuantConv2d, QuantMatMul)
    inputs: dict[str, tuple[torch.Tensor, ...]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, args))
        for name, m in model.named_modules()
        if isinstance(m, quantized)
    ]
    with torch.no_grad():
        model(x)
        for h in hooks:
            h.remove()
        deploy = to_deploy(model, **kw)
        for name, args in inputs.items():
            simulated, deployed = model.get_submodule(name)(*args), deploy.get_submodule(name)(*args)
            if isinstance(deploy.get_submodule(name), DeployLinear):  # the int32 bias's rounding
                deployed = deployed - deploy.get_submodule(name).bias_rounding()
            tolerance = 1e-5 * float(simulated.abs().max())
            assert torch.allclose(deployed, simulated, atol=tolerance), name
    assert len(inputs) == sum(isinstance(m, quantized) for m in model.modules())


def test_deploy_form_computes_the_simulated_function() -> None:
    model, x = _vit()
    dopq.quantize(
        model, x, dopq.get_preset("dopq", w_bits=4, a_bits=4, softmax_quantizer="log2"), progress=False
    )
    # integer weights, per-tensor Q/DQ and the input offset folded into the bias: the same function
    _assert_deploy_modules_compute_the_simulated_ones(model, x)


def test_the_deploy_form_reads_the_models_weights_without_copying_them(monkeypatch) -> None:
    """The deploy copy deep-copied every float weight only to replace each quantized layer by its
    integer codes: a second float copy of the model for the whole export (a ViT-B's 0.32 GiB). The
    codes are now read from the model's own weights, and the model is left as it was."""
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=4, a_bits=4), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {m.weight.data_ptr() for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))}
    read = []
    codes = UniformQuantizer.codes

    def recorded(self, w: torch.Tensor) -> torch.Tensor:
        read.append(w.data_ptr())
        return codes(self, w)

    monkeypatch.setattr(UniformQuantizer, "codes", recorded)
    for kw in ({}, {"target": "openvino"}, {"dtype": torch.float64}):
        read.clear()
        deploy = to_deploy(model, **kw)
        assert set(read) == weights, kw  # every quantized weight, and each from the model's storage
        assert not any(isinstance(m, (QuantLinear, QuantConv2d)) for m in deploy.modules())
    monkeypatch.undo()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _assert_deploy_modules_compute_the_simulated_ones(model, x)


def test_8_bit_inputs_add_their_bias_inside_onnxruntimes_integer_gemm(tmp_path: Path) -> None:
    """With 8-bit inputs every Linear exports as a Gemm with its bias as int32 codes in the
    product's units, which onnxruntime runs as one QGemm (no float Add over the output), the bias
    rounded by at most half a unit; 4-bit inputs and the OpenVINO form keep the float bias."""
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    ops, simulated, runtime = _ops_and_agreement(model, x, tmp_path / "m.onnx")
    linears = [m for m in to_deploy(model).modules() if isinstance(m, DeployLinear)]
    assert ops.get("QGemm", 0) == len(linears) == sum(isinstance(m, QuantLinear) for m in model.modules())
    rounding = torch.cat([m.bias_rounding().double() / m.bias_unit.double() for m in linears])
    assert all(m.bias_codes.dtype == torch.int32 for m in linears)
    assert rounding.abs().max() <= 0.5 + 1e-3 and rounding.abs().max() > 0.1, rounding.abs().max()
    _assert_same_function(runtime, simulated, 0.05)
    openvino = to_deploy(model, target="openvino")
    assert all(m.bias_codes is None for m in openvino.modules() if isinstance(m, DeployLinear))

    # below opset 15 the leading dimensions come from Shape -> Slice instead of Shape(end=-1)
    ops, simulated, runtime = _ops_and_agreement(model, x, tmp_path / "m13.onnx", opset=13)
    assert ops.get("QGemm", 0) == len(linears), ops
    _assert_same_function(runtime, simulated, 0.05)

    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=8, a_bits=4), progress=False)
    ops, _simulated, _runtime = _ops_and_agreement(model, x, tmp_path / "w8a4.onnx")
    assert "QGemm" not in ops, ops
    assert all(m.bias_codes is None for m in to_deploy(model).modules() if isinstance(m, DeployLinear))


@pytest.mark.parametrize(("w_bits", "a_bits"), [(4, 4), (8, 4)])
def test_4_bit_inputs_run_as_one_integer_kernel_with_the_float_bias(
    w_bits: int, a_bits: int, tmp_path: Path
) -> None:
    """Below 8-bit inputs every Linear exports as onnxruntime's contrib MatMulIntegerToFloat of the
    input's codes and the weight codes with the float bias (no rounding, no float Add after it),
    and the file computes the simulation's function in onnxruntime."""
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=w_bits, a_bits=a_bits), progress=False)
    ops, simulated, runtime = _ops_and_agreement(model, x, tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    products = [n for n in graph.node if n.op_type == "MatMulIntegerToFloat"]
    linears = [m for m in to_deploy(model).modules() if isinstance(m, DeployLinear)]
    assert len(products) == len(linears) == sum(isinstance(m, QuantLinear) for m in model.modules())
    assert all(n.domain == "com.microsoft" and len(n.input) == 7 for n in products)
    assert all(m.contrib_product and m.bias_codes is None for m in linears)
    # the 4-bit range clipped on the uint8 codes after each QuantizeLinear, not on the float input
    producer = {o: n for n in graph.node for o in n.output}
    for product in products:
        clip = producer[product.input[0]]
        assert clip.op_type == "Clip" and producer[clip.input[0]].op_type == "QuantizeLinear"
        bounds = [int(numpy_helper.to_array(producer[b].attribute[0].t)) for b in clip.input[1:]]
        assert bounds == [0, 15]
    quantize = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert not any(n.input[0] in producer and producer[n.input[0]].op_type == "Clip" for n in quantize)
    biases = {tuple(numpy_helper.to_array(inits[n.input[6]]).round(6).tolist()) for n in products}
    assert {tuple(m.bias.numpy().round(6).tolist()) for m in linears} <= biases  # float biases, as they are
    if w_bits == 4:  # the weight codes and zero points stored as INT4 behind a Cast to int8
        casts = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Cast"}
        packed = [inits[casts[n.input[slot]]] for n in products for slot in (1, 5)]
        assert all(t.data_type == onnx.TensorProto.INT4 for t in packed)
    # no constant added to a product afterwards (residual adds of two activations stay)
    outputs = {n.output[0] for n in products}
    constants = set(inits) | {n.output[0] for n in graph.node if n.op_type == "Constant"}
    adds = [n for n in graph.node if n.op_type == "Add" and outputs & set(n.input)]
    assert adds and not any(constants & set(n.input) for n in adds)
    assert ops.get("MatMulIntegerToFloat", 0) >= len(linears), ops
    _assert_same_function(runtime, simulated, 0.05)
    openvino = to_deploy(model, target="openvino")
    assert not any(m.contrib_product for m in openvino.modules() if isinstance(m, DeployLinear))


def test_a_bias_whose_codes_do_not_fit_keeps_the_float_form() -> None:
    unit = torch.tensor([1e-3, 1e-3])
    assert _bias_codes(torch.tensor([0.25, -0.2504]), unit).tolist() == [250, -250]
    assert _bias_codes(torch.tensor([1.0, 0.0]), torch.tensor([1e-3, 0.0])) is None  # an all-zero weight row
    too_large = torch.tensor([BIAS_CODE_LIMIT + 1.0, 0.0], dtype=torch.float64)
    assert _bias_codes(too_large, torch.ones(2)) is None


def test_refuses_models_that_are_not_quantized(tmp_path: Path) -> None:
    model, _x = _vit()
    with pytest.raises(ExportError, match="no quantizers"):
        export_onnx(model, tmp_path / "m.onnx")
    from dopq.config import get_preset
    from dopq.models import prepare_model

    prepare_model(model, get_preset("dopq"))
    with pytest.raises(ExportError, match="never calibrated"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_refuses_fractional_zero_points(tmp_path: Path) -> None:
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("repq", w_bits=8, a_bits=8), progress=False)
    with pytest.raises(ExportError, match="not an integer code"):
        export_onnx(model, tmp_path / "m.onnx")


def test_compact_save_holds_packed_codes_and_round_trips(tmp_path: Path) -> None:
    codes = torch.randint(0, 16, (7, 5))
    assert torch.equal(unpack_codes(pack_codes(codes, 4), 4, codes.numel()).reshape(7, 5), codes)
    assert pack_codes(codes, 4).numel() == 18
    model, x = _vit()
    config = dopq.get_preset("dopq", w_bits=4, a_bits=4)
    dopq.quantize(model, x, config, progress=False)
    path = save_quantized(model, tmp_path / "q.pt", config)
    payload = torch.load(path, weights_only=True)
    assert "blocks.0.mlp.fc1.weight" not in payload["state_dict"]
    fc1 = payload["weight_codes"]["blocks.0.mlp.fc1.weight"]
    assert (
        fc1["packed"].dtype == torch.uint8
        and fc1["packed"].numel() * 2 == model.blocks[0].mlp.fc1.weight.numel()
    )
    loaded, _, _ = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


# --- command line ------------------------------------------------------------------------------


def _one_error(code: int, err: str, match: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dopq: error: "), err
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def images(image_folder) -> Path:
    return image_folder("export-data", per_class=3, size=32, ext="png")


def _quantize(images: Path, *extra: str) -> list[str]:
    return ["quantize", "--model", "test_vit", "--data", str(images), "--calib-size", "4", "--quiet",
            "--w-bits", "4", "--a-bits", "4", *extra]  # fmt: skip


def test_cli_quantize_export_evaluate(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_path, saved, run = tmp_path / "m.onnx", tmp_path / "q.pt", tmp_path / "run.json"
    argv = _quantize(images, "--save", str(saved), "--export", str(onnx_path), "--output", str(run))
    assert main(argv) == 0, capsys.readouterr().err
    assert "quantized: Linear 25/25, Conv2d 1/1, attention 6/6" in capsys.readouterr().out
    recorded = json.loads(run.read_text())
    assert not any(recorded["coverage"]["left_float"].values())
    assert len(recorded["git"]["commit"]) == 40 and isinstance(recorded["git"]["dirty"], bool)  # provenance
    assert read_metadata(onnx_path)["recipe"]["w_bits"] == 4
    out = tmp_path / "ev.json"
    argv = ["evaluate", "--onnx", str(onnx_path), "--quantized", str(saved), "--data", str(images),
            "--quiet", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["eval_images"] == 6 and result["comparison"]["images"] == 6
    assert result["comparison"]["simulation_threads"] == torch.get_num_threads()  # the runtime's: "threads"
    assert result["comparison"]["identical_top1"] >= 5 / 6
    agreement = f"identical top-1 on {100 * result['comparison']['identical_top1']:.2f}% of 6 images"
    assert agreement in printed and agreement in out.with_suffix(".md").read_text()  # not in the JSON only
    assert f"Quantized by: `{recorded['command']}`\n" in out.with_suffix(".md").read_text()
    other = tmp_path / "other.pt"  # the same model under another recipe: not what the graph was made from
    saved_payload = torch.load(saved, weights_only=True)
    saved_payload["config"]["bias_correction"] = not saved_payload["config"]["bias_correction"]
    from dopq.serialize import payload_digest

    saved_payload["digest"] = payload_digest(saved_payload)
    torch.save(saved_payload, other)
    argv = ["evaluate", "--onnx", str(onnx_path), "--quantized", str(other), "--data", str(images), "--quiet"]
    _one_error(main(argv), capsys.readouterr().err, "was exported from another recipe than --quantized")
    again = tmp_path / "again.onnx"
    assert main(["export", "--quantized", str(saved), "--out", str(again), "--quiet", "--threads", "1"]) == 0
    # the same graph, on one thread too; the metadata differ by the command that wrote each file
    assert onnx.load(again).graph.SerializeToString() == onnx.load(onnx_path).graph.SerializeToString()
    # and keep the command that quantized the model (dopq export had written its own in its place)
    assert read_metadata(again)["command"] == recorded["command"] == read_metadata(onnx_path)["command"]
    assert read_metadata(again)["export_command"].startswith("dopq export --quantized")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        pytest.param(lambda t: ["--export", str(t / "m.onnx"), "--opset", "11"], "opset 11 is not supported",
                     id="low-opset"),
        pytest.param(lambda t: ["--export", str(t / "file.txt" / "m.onnx")], "cannot create its folder",
                     id="unwritable"),
        pytest.param(lambda t: ["--export", str(t)], "is a folder", id="directory"),
    ],
)  # fmt: skip
def test_cli_export_errors_come_before_any_work(argv, match, images: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "file.txt").write_text("x")
    # a model that does not exist: the export check must fail first, before the model is built
    code = main(["quantize", "--model", "no_such_model", "--data", str(images), *argv(tmp_path)])
    _one_error(code, capsys.readouterr().err, match)


def test_cli_refuses_an_uncalibrated_model_and_fractional_zero_points(
    images: Path, tmp_path: Path, capsys
) -> None:
    from dopq.config import get_preset
    from dopq.models import prepare_model

    model, _ = _vit()
    config = get_preset("dopq")
    prepare_model(model, config)  # quantizers inserted, never calibrated
    saved = save_quantized(model, tmp_path / "raw.pt", config)
    code = main(["export", "--quantized", str(saved), "--out", str(tmp_path / "m.onnx")])
    _one_error(code, capsys.readouterr().err, "never calibrated")
    assert not (tmp_path / "m.onnx").exists()
    code = main(["quantize", "--model", "no_such_model", "--data", str(images), "--method", "repq",
                 "--export", str(tmp_path / "m.onnx")])  # fmt: skip
    _one_error(code, capsys.readouterr().err, "needs integer zero points")


def test_cli_missing_onnxruntime(images: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    code = main(_quantize(images, "--export", str(tmp_path / "m.onnx")))
    _one_error(code, capsys.readouterr().err, "needs onnxruntime")


def test_cli_export_and_evaluate_bad_files(tmp_path: Path, images: Path, capsys) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    _one_error(main(["export", "--quantized", str(junk), "--out", str(tmp_path / "m.onnx")]),
               capsys.readouterr().err, "not a readable dopq file")  # fmt: skip
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    _one_error(main(["evaluate", "--onnx", str(bad), "--data", str(images)]), capsys.readouterr().err,
               "onnxruntime cannot load")  # fmt: skip
    _one_error(main(["evaluate", "--data", str(images)]), capsys.readouterr().err, "needs --quantized")


def test_modules_with_different_post_softmax_kinds_save_load_and_export(tmp_path: Path) -> None:
    from dopq.models import softmax_kinds

    model, x = _vit()
    config = dopq.get_preset("dopq", w_bits=4, a_bits=4, softmax_quantizer="auto")
    dopq.quantize(model, x, config, progress=False)
    # every candidate is calibrated on each module: pick a different family in three of them
    for block, choice in ((0, 0), (1, 1), (2, 2)):
        model.blocks[block].attn.matmul_av.quantizer_a.choice.fill_(choice)
    kinds = softmax_kinds(model)
    assert {kinds["blocks.0.attn"], kinds["blocks.1.attn"], kinds["blocks.2.attn"]} == {
        "tanq",
        "log2",
        "logsqrt2",
    }
    loaded, _, _ = load_quantized(save_quantized(model, tmp_path / "q.pt", config))
    assert softmax_kinds(loaded) == kinds
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    _assert_deploy_modules_compute_the_simulated_ones(model, x)
    _, simulated, runtime = _ops_and_agreement(model, x, tmp_path / "m.onnx")
    _assert_same_function(runtime, simulated, 0.05)


FLOAT64_CASES = [
    pytest.param(_vit, 8, "uniform", id="vit-w8a8-uniform"),
    pytest.param(_vit, 4, "tanq", id="vit-w4a4-tanq"),
    pytest.param(_vit, 3, "logsqrt2", id="vit-w3a3-logsqrt2"),
    pytest.param(_swin, 4, "tanq", id="swin-w4a4-tanq"),
    pytest.param(_swin, 3, "log2", id="swin-w3a3-log2"),
    pytest.param(_beit, 4, "tanq", id="beit-w4a4-tanq"),
    pytest.param(_swinv2, 4, "tanq", id="swinv2-w4a4-tanq"),  # timm's own GELU module
]


def _float64_erf_nodes(path: str | Path) -> list[str]:
    """``Erf`` / ``Gelu`` nodes of a graph whose input is float64 (onnxruntime has no such kernel)."""
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input]}
    return [
        n.name or n.op_type
        for n in graph.node
        if n.op_type in ("Erf", "Gelu") and dtypes.get(n.input[0]) == onnx.TensorProto.DOUBLE
    ]


@pytest.mark.parametrize(("make", "bits", "softmax"), FLOAT64_CASES)
def test_float64_export_gives_the_float64_simulation_logits(make, bits, softmax, tmp_path: Path) -> None:
    model, x = make()
    config = dopq.get_preset("dopq", w_bits=bits, a_bits=bits, softmax_quantizer=softmax)
    dopq.quantize(model, x, config, progress=False)
    report = export_onnx(model, tmp_path / "m.onnx", float_dtype="float64")
    assert report.float_dtype == "float64" and read_metadata(report.path)["float_dtype"] == "float64"
    with torch.no_grad():
        simulated, deployed = float64_copy(model)(x), to_deploy(model, dtype=torch.float64)(x)
    runtime = OnnxModel(report.path, threads=1)(x)
    # no float32 rounding between the quantizers: every code is the simulation's, so the logits
    # agree to float64 rounding (then cast to float32), not just the predictions
    scale = float(simulated.abs().max())
    assert float((deployed - simulated).abs().max()) <= 1e-6 * scale
    assert float((runtime - simulated).abs().max()) <= 1e-6 * scale
    assert not _float64_erf_nodes(report.path)
    ops = optimized_op_counts(report.path)
    linears = sum(isinstance(m, QuantLinear) for m in model.modules())
    matmuls = sum(isinstance(m, QuantMatMul) for m in model.modules())
    # every Linear, the patch embedding and every q @ k^T (and attn @ v with a uniform grid)
    integer_products = linears + 1 + matmuls // 2 + (matmuls // 2 if softmax == "uniform" else 0)
    assert ops.get("MatMulInteger", 0) == integer_products, ops
    assert "QuantizeLinear" not in ops and "Conv" not in ops


# the first 8 test images of the shared CIFAR-10 archive (calibration) and two whose GELU value at
# block 0's fc2 input lies 3.6e-7 of a step below a rounding boundary in timm's test_vit (seed 1) at W8/A8
CALIBRATION = [f"test/bird/{n}.jpg" for n in ("0338", "0255", "0412", "0675", "0965", "0714", "0149", "0034")]
NEAR_TIE = ["test/bird/0282.jpg", "test/bird/0645.jpg"]


def _cifar_images(names: list[str], size: int) -> torch.Tensor:
    """Named images of the shared CIFAR-10 archive, resized bilinear and normalized (ImageNet)."""
    from PIL import Image

    found = {}
    with tarfile.open(require(CIFAR)) as tar:
        for member in tar:
            if member.name in names:
                image = Image.open(io.BytesIO(tar.extractfile(member).read())).convert("RGB")
                found[member.name] = np.asarray(image.resize((size, size), Image.BILINEAR), np.float32) / 255
    x = torch.from_numpy(np.stack([found[name] for name in names])).permute(0, 3, 1, 2)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


def test_float64_export_gives_the_simulation_codes_next_to_a_gelu_rounding_boundary(tmp_path: Path) -> None:
    """On these two real images the float64 graph's float32 erf (before session 40) gave code 121
    at block 0's fc2 input where the float64 simulation gives 120 (GELU / step = 51.4999996), and
    their logits differed by 3e-3; the graph decides by the boundary's float64 pre-image now."""
    torch.manual_seed(1)
    model = timm.create_model("test_vit", num_classes=10).eval()
    images = _cifar_images(CALIBRATION + NEAR_TIE, 160)
    dopq.quantize(model, images[:8], dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    x, simulation, seen = images[8:], float64_copy(model), {}
    hook = simulation.model.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, out: seen.update(fc1=out))
    with torch.no_grad():
        simulated = simulation(x)
    hook.remove()
    t = F.gelu(seen["fc1"]) / model.blocks[0].mlp.fc2.input_quantizer.scale.double()
    assert float((t - t.floor() - 0.5).abs().min()) < 1e-6  # the near tie is still there
    report = export_onnx(model, tmp_path / "m.onnx", float_dtype="float64")
    assert torch.equal(OnnxModel(report.path, threads=1)(x), simulated)


class _GeluCodes(nn.Module):
    """GELU read by a float64 activation quantizer, as fc2's input in the float64 deploy form."""

    def __init__(self, scale: float, zero_point: int, bits: int) -> None:
        super().__init__()
        self.scale, self.zero_point, self.bits = scale, zero_point, bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quantize_codes(F.gelu(x), self.scale, self.zero_point, self.bits)


def _rewritten(module: nn.Module, x: torch.Tensor, path: Path) -> tuple[np.ndarray, list[str]]:
    """``module`` exported in float64, its Erf / Gelu rewritten as the export does; the runtime's
    output on ``x`` and the graph's op types."""
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=21, input_names=["x"])
    model = onnx.load(str(path))
    exact_float64_gelu(model)
    onnx.save(model, str(path))
    assert not _float64_erf_nodes(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0], [n.op_type for n in model.graph.node]


def _ulps_away(x: torch.Tensor, ulps: int) -> torch.Tensor:
    """The float64 numbers ``ulps`` steps above ``x`` (below where negative)."""
    for _ in range(abs(ulps)):
        x = torch.nextafter(x, x + ulps)
    return x


@pytest.mark.parametrize(
    ("scale", "zero_point", "bits"),
    [(0.002421584678813815, 69, 8), (0.0113, 15, 8), (0.047, 3, 4), (0.31, 0, 4), (0.0021, 200, 8)],
)
def test_gelu_codes_by_boundary_pre_image_are_the_simulated_ones(
    scale: float, zero_point: int, bits: int, tmp_path: Path
) -> None:
    """At every boundary's pre-image on both GELU branches, the float64 just below it and 16 float64
    numbers either side, at GELU's minimum, past both clip ends and on random values: the rewritten
    graph's codes are torch's float64 ``gelu`` quantized (the simulation's). Closer than about 8
    float64 numbers to a pre-image torch's float64 ``gelu`` itself is not always monotone (at 26 of
    the 327 boundaries of the first scale), so no threshold can follow it there."""
    module = _GeluCodes(scale, zero_point, bits)
    k_low, k_high = int(np.floor(-0.17 / scale)) - 1, 2**bits - 1 - zero_point
    rising, falling = torch.from_numpy(boundary_pre_images(scale, k_low, k_high))
    k = torch.arange(k_low, k_high + 1, dtype=torch.float64)
    code = lambda v: torch.round(F.gelu(v) / scale)  # noqa: E731
    up, down = (rising > GELU_ARGMIN), (falling > -np.inf) & (falling < GELU_ARGMIN)
    assert torch.equal(code(rising)[up], k[up] + 1)
    assert torch.equal(code(torch.nextafter(rising, rising - 1))[up], k[up])
    assert torch.equal(code(falling)[down], k[down])
    assert torch.equal(code(torch.nextafter(falling, falling - 1))[down], k[down] + 1)
    assert int(up.sum()) > 2**bits // 2 and int(down.sum()) >= 1  # both branches have boundaries
    special = torch.tensor([GELU_ARGMIN, 0.0, -0.0, 1e-300, -40.0, -1e3, 1e3, 1e300, -1e300, -1.7e308])
    points = torch.cat([rising, falling, special])
    near = [points, _ulps_away(points, -1), _ulps_away(points, 16), _ulps_away(points, -16)]
    x = torch.cat([*near, torch.randn(20000) * 2])
    x = x[x.isfinite()]  # gelu(-inf) is NaN: no code
    out, ops = _rewritten(module, x.double(), tmp_path / "g.onnx")
    assert "Gather" in ops and "Round" not in ops  # the boundary form, not the float64 erf
    with torch.no_grad():
        assert torch.equal(torch.from_numpy(out), module(x.double()))


def test_float64_erf_nodes_are_within_two_ulps_of_erf(tmp_path: Path) -> None:
    """A float64 ``Erf`` the boundary form does not cover gets a float64 erf from elementwise nodes:
    within 2 float64 ulps of ``math.erf`` (itself within 1) densely from -7 to 7, at +-0,
    subnormal, tiny and huge values and both ends of each piece; +-1 at +-inf, NaN at NaN."""
    edges = [1.0, np.nextafter(1.0, 0.0), 6.0, np.nextafter(6.0, 0.0), 5e-324, 1e-300, 1e-10, 30.0, 1e300]
    z = np.concatenate([np.linspace(-7, 7, 280001), edges, np.negative(edges), [0.0, -0.0]])
    out, _ = _rewritten(_Wrap(torch.erf), torch.from_numpy(z), tmp_path / "erf.onnx")
    expected = np.array([math.erf(v) for v in z])
    ulps = np.abs(out - expected) / np.spacing(np.maximum(np.abs(expected), 5e-324))
    assert float(ulps.max()) <= 2.0, z[ulps.argmax()]
    assert bool((out[z == 0] == 0).all())  # -0 gives +0 (GELU multiplies by x: no sign lost there)
    specials = torch.tensor([np.inf, -np.inf, np.nan], dtype=torch.float64)
    out, _ = _rewritten(_Wrap(torch.erf), specials, tmp_path / "inf.onnx")
    assert out[0] == 1.0 and out[1] == -1.0 and np.isnan(out[2])


def test_a_gelu_read_by_other_nodes_gets_the_float64_erf(tmp_path: Path) -> None:
    """A GELU not read by an activation quantizer alone keeps its value, computed in float64."""
    x = torch.linspace(-8, 8, 40001, dtype=torch.float64)
    out, ops = _rewritten(_Wrap(lambda t: F.gelu(t) + t), x, tmp_path / "g.onnx")
    assert "Gather" not in ops
    expected = (F.gelu(x) + x).numpy()
    assert float(np.abs(out - expected).max()) <= 4 * float(np.spacing(np.abs(expected)).max())


def test_float64_copy_keeps_the_float32_weight_codes() -> None:
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=4, a_bits=4), progress=False)
    copy64 = float64_copy(model)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in copy64.model.named_modules():
        if name in layers:
            q = layers[name].weight_quantizer
            zero_point, scale = (t.double().reshape(-1, 1) for t in (q.zero_point, q.scale))
            expected = (q.codes(layers[name].weight).double() - zero_point) * scale
            assert module.weight.dtype == torch.float64 and torch.equal(module.weight, expected)
    with torch.no_grad():
        simulated, exact = model(x), copy64(x)
    assert exact.dtype == torch.float32
    # the same function: most images agree to float32 rounding; on the rest a value within
    # float32 rounding of a rounding boundary took the other code in the float32 model
    per_image = (exact - simulated).abs().amax(1)
    assert (per_image <= 1e-5 * float(simulated.abs().max())).float().mean() >= 0.75, per_image


def test_level_tables_are_float32_numbers_in_a_float64_model() -> None:
    for name in ("tanq", "log2", "logsqrt2"):
        q = build_quantizer(name, 4, **({"objective": "mse"} if name == "tanq" else {}))
        q.observing = True
        q(torch.softmax(torch.randn(2, 2, 16, 16) * 3, -1))
        levels32, thresholds32 = q.level_table()
        levels64, thresholds64 = q.double().level_table()
        assert levels64.dtype == torch.float64
        assert torch.equal(levels64, levels32.double()) and torch.equal(thresholds64, thresholds32.double())


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_float64_levels_on_a_grid_follow_the_grid_cell(bits: int) -> None:
    """A snapped threshold is the float32 just below a grid point ``g``; the float64 values between
    it and ``g`` lie in the cell below ``g``. The float64 simulation (by the cell, as on a CPU, and
    by counting its thresholds, as on a GPU) and the float64 export's comparisons all give them
    that cell's level (the export compared with the float32 threshold and gave the next one)."""
    q = build_quantizer("tanq", bits, objective="mse", grid_bits=16)
    q.observing = True
    q(torch.softmax(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(bits)) * 4, -1))
    q.observing = False
    snapped = q.level_table()[1]
    g = torch.nextafter(snapped, torch.tensor(1.0)).double()
    between = (snapped.double() + g) / 2
    assert bool(((snapped.double() < between) & (between < g)).all())
    x = torch.cat([between, g, torch.nextafter(g, torch.tensor(0.0, dtype=torch.float64))])
    q64 = q.double()
    cells = torch.cat([g, g, g]) * 2**16 - torch.tensor([1.0, 0.0, 1.0]).repeat_interleave(len(g))
    assert torch.equal(q64.codes(x), q64.code_grid()[1][cells.long()])
    assert torch.equal(q64.codes(x), torch.bucketize(x, q64.level_table()[1]))
    with torch.no_grad():
        assert torch.equal(SoftmaxLevels(q).exact(x), q64(x))


def test_float64_export_refuses_overlapping_convolutions(tmp_path: Path) -> None:
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    model.patch_embed.proj.stride = (8, 8)  # kernel 16: overlapping patches
    with pytest.raises(ExportError, match="non-overlapping convolutions"):
        export_onnx(model, tmp_path / "m.onnx", float_dtype="float64")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_float64_export_reproduces_the_reported_accuracy(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_path, saved, run = tmp_path / "m.onnx", tmp_path / "q.pt", tmp_path / "run.json"
    argv = _quantize(images, "--save", str(saved), "--export", str(onnx_path), "--export-dtype", "float64",
                     "--output", str(run))  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    recorded = json.loads(run.read_text())
    assert recorded["eval_dtype"] == "float64" and recorded["export"]["float_dtype"] == "float64"
    out = tmp_path / "ev.json"
    argv = ["evaluate", "--onnx", str(onnx_path), "--quantized", str(saved), "--data", str(images),
            "--quiet", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(out.read_text())
    comparison = result["comparison"]
    assert comparison["simulation_dtype"] == "float64" and comparison["identical_top1"] == 1.0
    assert comparison["max_logit_diff"] <= 1e-5
    assert result["quant_top1"] == recorded["quant_top1"]
    assert main([*argv[:-2], "--eval-dtype", "float32"]) == 2
    assert "--eval-dtype is for --quantized alone" in capsys.readouterr().err
    saved_run = tmp_path / "saved.json"
    argv = ["evaluate", "--quantized", str(saved), "--data", str(images), "--quiet", "--eval-dtype", "float64",
            "--output", str(saved_run)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(saved_run.read_text())["quant_top1"] == recorded["quant_top1"]


@pytest.mark.parametrize(
    ("w_bits", "target", "float_dtype"),
    [
        (2, "onnxruntime", "float32"),
        (3, "onnxruntime", "float32"),
        (3, "openvino", "float32"),
        (3, "onnxruntime", "float64"),
        (4, "onnxruntime", "float32"),
    ],
)
def test_every_weight_of_at_most_4_bits_is_stored_as_int4(
    w_bits: int, target: str, float_dtype: str, tmp_path: Path
) -> None:
    """At W <= 4 no weight stays in an 8-bit container. The recommended preset's symmetric weights
    have all-zero zero points, which the TorchScript exporter stores once per shape and reads through
    Identity nodes; those layers were left unpacked (a W3/A3 DeiT-Tiny file at 0.28x FP32, its
    W4/A4 file 0.17x). The packed onnxruntime file computes the simulation's function."""
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("recommended", w_bits=w_bits, a_bits=w_bits), progress=False)
    report = export_onnx(model, tmp_path / "m.onnx", target=target, float_dtype=float_dtype)
    graph = onnx.load(report.path).graph
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    unpacked = [i.name for i in graph.initializer if i.data_type in eight_bit and np.prod(i.dims) >= 64]
    assert not unpacked
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d)))
    packed = sum(np.prod(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.INT4)
    assert packed >= weights
    assert not any(
        n.op_type == "Identity" and n.input[0] in {i.name for i in graph.initializer} for n in graph.node
    )
    if target == "onnxruntime" and float_dtype == "float32":
        with torch.no_grad():
            simulated = model(x)
        _assert_same_function(OnnxModel(report.path, threads=1)(x), simulated, 0.05)


def test_w4a8_deploys_with_int4_weights_and_8bit_integer_kernels(tmp_path: Path) -> None:
    """The CPU deployment recipe: 4-bit weights (size) with 8-bit activations (speed, the same
    integer kernels as W8/A8), quantized, saved, loaded and exported end to end."""
    model, x = _vit()
    config = dopq.get_preset("dopq", w_bits=4, a_bits=8)
    assert config.softmax_quantizer == "uniform"  # 8-bit post-Softmax values: a uniform grid
    dopq.quantize(model, x, config, progress=False)
    loaded, _, _ = load_quantized(save_quantized(model, tmp_path / "q.pt", config))
    w4a8 = export_onnx(loaded, tmp_path / "w4a8.onnx")
    w8a8_model, _ = _vit()
    dopq.quantize(w8a8_model, x, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    w8a8 = export_onnx(w8a8_model, tmp_path / "w8a8.onnx")
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d)))
    assert w4a8.weight_storage == "int4" and w8a8.bytes - w4a8.bytes > 0.45 * weights  # half a byte each
    ops = optimized_op_counts(w4a8.path)
    matmuls = sum(isinstance(m, QuantMatMul) for m in model.modules())
    linears = sum(isinstance(m, QuantLinear) for m in model.modules())
    # every token-wise Linear and both attention products on integer kernels, no float MatMul
    assert sum(n for op, n in ops.items() if op in INTEGER_OPS) >= linears - 1 + matmuls, ops
    assert ops.get("MatMul", 0) == 0 and "Clip" not in ops, ops
    with torch.no_grad():
        simulated = model(x)
    _assert_same_function(OnnxModel(w4a8.path, threads=1)(x), simulated, 0.05)


@pytest.mark.parametrize(
    ("target", "weight_type", "storage"),
    [
        ("onnxruntime", "int8", "int4+int8"),
        ("onnxruntime", "uint8", "int4+uint8"),
        ("openvino", None, "int4+int8"),
    ],
)
def test_8bit_edge_layers_export_beside_4bit_blocks(
    target: str, weight_type: str | None, storage: str, tmp_path: Path
) -> None:
    """``edge_w_bits=8``: the patch embedding and head keep 8-bit codes (int8 or uint8, as asked; int8
    for OpenVINO) in a W4/A4 file whose other weights are packed INT4, saved, loaded and exported with the
    simulated function."""
    model, x = _vit()
    config = dopq.get_preset("dopq", w_bits=4, a_bits=4, edge_w_bits=8)
    dopq.quantize(model, x, config, progress=False)
    loaded, _, _ = load_quantized(save_quantized(model, tmp_path / "q.pt", config))
    assert loaded.patch_embed.proj.weight_quantizer.bits == loaded.head.weight_quantizer.bits == 8
    assert loaded.blocks[0].mlp.fc1.weight_quantizer.bits == 4
    report = export_onnx(loaded, tmp_path / "m.onnx", target=target, weight_type=weight_type)
    assert report.weight_storage == storage
    assert onnx_metadata(report.path)["needs_vnni"] is (weight_type != "uint8")
    inits = {i.name: i for i in onnx.load(report.path).graph.initializer}
    edge = [n for n in inits if n.startswith(("patch_embed.proj.weight.codes", "head.weight.codes"))]
    assert len(edge) == 2 and all(inits[n].data_type != onnx.TensorProto.INT4 for n in edge), edge
    assert inits["blocks.0.mlp.fc1.weight.codes_int4"].data_type == onnx.TensorProto.INT4
    with torch.no_grad():
        simulated = model(x)
    if inexact_here(report.path) is None:  # int8 8-bit weights are exact only with VNNI
        _assert_same_function(OnnxModel(report.path, threads=1)(x), simulated, 0.05)


@pytest.mark.parametrize("isa", [["avx2"], ["avx2", "avx512_vnni"], ["avx2", "avx_vnni", "amx_int8"]])
def test_int8_8bit_weights_warn_on_x86_cpus_without_vnni_only(
    isa: list[str], tmp_path: Path, monkeypatch
) -> None:
    """8-bit weights in int8 (the float32 default on CPUs with VNNI) can saturate in uint8 x int8
    kernels without VNNI: loading such a file there warns and names the exact export; uint8 weights
    never warn."""
    import dopq.environment

    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    signed = export_onnx(model, tmp_path / "s8.onnx", weight_type="int8")
    unsigned = export_onnx(model, tmp_path / "u8.onnx", weight_type="uint8")
    assert (signed.weight_storage, unsigned.weight_storage) == ("int8", "uint8")
    assert onnx_metadata(signed.path)["needs_vnni"] and not onnx_metadata(unsigned.path)["needs_vnni"]
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    monkeypatch.setattr(dopq.environment, "cpu_info", lambda: {"model": "Some CPU", "integer_isa": isa})
    assert inexact_here(unsigned.path) is None
    reason = inexact_here(signed.path)
    if len(isa) > 1:
        assert reason is None
        return
    assert "Some CPU" in reason and "--export-weight-type uint8" in reason
    renamed = Path(shutil.copy(signed.path, tmp_path / "model.bin"))  # the file's name does not matter
    for path in (signed.path, renamed):
        with pytest.warns(UserWarning, match="no VNNI"):
            dopq.export.load_runtime(path, "onnxruntime", threads=1)
    assert inexact_here(renamed) == reason.replace(str(signed.path), str(renamed))


@pytest.mark.parametrize(
    ("machine", "isa", "onnxruntime_default"),
    [
        ("x86_64", ["avx2"], "uint8"),
        ("x86_64", ["avx2", "avx512_vnni"], "int8"),
        ("x86_64", ["avx2", "avx_vnni", "amx_int8"], "int8"),
        ("aarch64", [], "int8"),
    ],
)
def test_8bit_weights_default_to_the_exact_container_of_the_exporting_cpu(
    machine: str, isa: list[str], onnxruntime_default: str, tmp_path: Path, monkeypatch
) -> None:
    """Without ``weight_type`` the onnxruntime form stores 8-bit weights where this CPU adds them
    exactly: uint8 on x86 without VNNI (AVX2 only, where uint8 x int8 pairs saturate), int8 elsewhere;
    the openvino form int8 (the only weights OpenVINO's kernels take) and the float64 form uint8."""
    import dopq.environment

    monkeypatch.setattr("platform.machine", lambda: machine)
    monkeypatch.setattr(dopq.environment, "cpu_info", lambda: {"model": "Some CPU", "integer_isa": isa})
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    ort = export_onnx(model, tmp_path / "ort.onnx")
    assert ort.weight_storage == onnxruntime_default and inexact_here(ort.path) is None
    assert onnx_metadata(ort.path)["needs_vnni"] is (onnxruntime_default == "int8")
    assert export_onnx(model, tmp_path / "ov.onnx", target="openvino").weight_storage == "int8"
    assert export_onnx(model, tmp_path / "f64.onnx", float_dtype="float64").weight_storage == "uint8"


def test_float64_export_keeps_exact_uint8_weights_by_default(tmp_path: Path) -> None:
    """The float64 form (exact on every CPU) stores 8-bit weights as uint8 unless told otherwise."""
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    report = export_onnx(model, tmp_path / "f64.onnx", float_dtype="float64")
    assert report.weight_storage == "uint8" and not onnx_metadata(report.path)["needs_vnni"]


def _split_graph(scales: tuple[float, float, float]):
    """``x (4, 6) -> Transpose -> Split into 3 -> Q/DQ each (int8, the given scales) -> Concat``."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
        helper.make_node("Split", ["t", "sizes"], ["s0", "s1", "s2"], axis=0),
    ]
    inits = [numpy_helper.from_array(np.array([2, 2, 2], np.int64), "sizes")]
    for i, scale in enumerate(scales):
        inits += [
            numpy_helper.from_array(np.array(scale, np.float32), f"scale{i}"),
            numpy_helper.from_array(np.array(0, np.int8), f"zp{i}"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [f"s{i}", f"scale{i}", f"zp{i}"], [f"q{i}"]),
            helper.make_node("DequantizeLinear", [f"q{i}", f"scale{i}", f"zp{i}"], [f"d{i}"]),
        ]
    nodes.append(helper.make_node("Concat", ["d0", "d1", "d2"], ["y"], axis=1))
    graph = helper.make_graph(
        nodes, "split", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 4])], inits,
    )  # fmt: skip
    # IR version 10, as torch writes it (onnx 1.19 defaults to 12, which onnxruntime 1.23 cannot read)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_identical_pairs_after_a_split_become_one_pair_before_its_rearrangements() -> None:
    """merge_split_qdq: three identical per-tensor pairs on a Split's outputs become one pair on the
    tensor before the Split's Transpose, with the same result; pairs that differ stay."""
    import onnxruntime as ort

    from dopq.export.qdq_placement import merge_split_qdq

    x = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)

    def run(model) -> np.ndarray:
        onnx.checker.check_model(model)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0]

    same = _split_graph((0.02, 0.02, 0.02))
    reference = run(same)
    assert merge_split_qdq(same) == 1
    ops = [n.op_type for n in same.graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.index("QuantizeLinear") < ops.index("Transpose")
    assert np.array_equal(run(same), reference)
    different = _split_graph((0.02, 0.02, 0.03))
    assert merge_split_qdq(different) == 0
    assert [n.op_type for n in different.graph.node].count("QuantizeLinear") == 3


def _perturbed(model: nn.Module) -> nn.Module:
    """Every parameter moved by N(0, 0.02^2): timm's zero biases and unit norms would leave layers inert."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


_TINY_VIT = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=10)


def test_a_partial_model_with_float_attention_pooling_exports_saves_and_loads(tmp_path: Path) -> None:
    """An attention-pool head dopq does not know (timm's ``AttentionPoolLatent``), left float with
    allow_partial: the export traced its fused ``scaled_dot_product_attention`` (a raw TypeError), and
    the saved file was refused on load (allow_partial was a CLI-only record)."""
    from dopq.serialize import load_quantized, save_quantized

    torch.manual_seed(0)
    model = _perturbed(timm.create_model("vit_base_patch16_224", global_pool="map", **_TINY_VIT))
    assert model.attn_pool.fused_attn
    images = torch.randn(8, 3, 32, 32)
    config = dopq.get_preset("recommended", w_bits=8, a_bits=8)
    qmodel = dopq.quantize(model, images, config, progress=False, allow_partial=True)
    kwargs = {**_TINY_VIT, "global_pool": "map"}
    loaded, _, _ = load_quantized(save_quantized(qmodel, tmp_path / "q.pt", config, model_kwargs=kwargs))
    with torch.no_grad():
        out = qmodel(images)
        assert torch.equal(loaded(images), out)
    export_onnx(qmodel, tmp_path / "q.onnx")
    with torch.no_grad():  # 8-bit codes a float rounding apart move logits by a few thousandths
        assert (OnnxModel(tmp_path / "q.onnx", threads=1)(images) - out).abs().max() < 0.05 * out.std()


def test_a_dynamic_img_size_model_records_the_input_size_its_graph_takes(tmp_path: Path) -> None:
    """A timm model created with ``dynamic_img_size=True`` is traced at the ``img_size`` it was built
    with (only the batch axis is dynamic); the file recorded its ``pretrained_cfg`` size instead (224
    here), so ``dopq evaluate --onnx`` fed the graph images it refuses."""
    torch.manual_seed(0)
    model = _perturbed(timm.create_model("vit_base_patch16_224", dynamic_img_size=True, **_TINY_VIT))
    images = torch.randn(8, 3, 32, 32)
    dopq.quantize(model, images, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    cli_metadata = {"preprocess": {"input_size": [3, 224, 224]}}  # what `dopq export` passes on
    path = export_onnx(model, tmp_path / "q.onnx", metadata=cli_metadata).path
    dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
    assert read_metadata(path)["preprocess"]["input_size"] == [3, 32, 32] == [d.dim_value for d in dims[1:]]
    with torch.no_grad():
        _assert_same_function(OnnxModel(path, threads=1)(images), model(images), 0.05)


def test_rms_norm_models_export_in_float32_and_exactly_in_float64(tmp_path: Path) -> None:
    """timm's ``RmsNorm`` (AIMv2's layout: RMS norms, no class token, average pooling): torch's ONNX
    exporter has no ``rms_norm`` below opset 23 and every export stopped with its error."""
    from dopq.modules import float64_copy

    torch.manual_seed(0)
    model = _perturbed(timm.create_model("aimv2_large_patch14_224", **_TINY_VIT))
    images = torch.randn(8, 3, 32, 32)
    qmodel = dopq.quantize(model, images, dopq.get_preset("recommended", w_bits=4, a_bits=4), progress=False)
    export_onnx(qmodel, tmp_path / "q.onnx")
    export_onnx(qmodel, tmp_path / "q64.onnx", float_dtype="float64")
    assert not any(n.op_type.startswith("RMS") for n in onnx.load(str(tmp_path / "q.onnx")).graph.node)
    with torch.no_grad():
        out = qmodel(images)
        assert (OnnxModel(tmp_path / "q.onnx", threads=1)(images) - out).abs().max() < 1e-3 * out.abs().max()
        assert torch.equal(
            OnnxModel(tmp_path / "q64.onnx", threads=1)(images).double(),
            float64_copy(qmodel)(images.double()),
        )


def test_what_the_onnx_exporter_cannot_trace_is_an_export_error(tmp_path: Path) -> None:
    class Untraceable(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.special.airy_ai(x)  # no ONNX form

    torch.manual_seed(0)
    model = _perturbed(timm.create_model("vit_base_patch16_224", **_TINY_VIT))
    qmodel = dopq.quantize(
        model, torch.randn(4, 3, 32, 32), dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False
    )
    qmodel.fc_norm = Untraceable()
    with pytest.raises(ExportError, match=r"exporter cannot trace this model: .*airy"):
        export_onnx(qmodel, tmp_path / "q.onnx")


def test_export_checks_opset_and_metadata_before_any_work(tmp_path: Path) -> None:
    """An opset that is not an int and metadata that is not a dict of JSON-ready entries with str
    keys were raw TypeErrors (from a comparison, ``json`` or protobuf, the latter at the export's end)."""
    model, _ = _vit()  # not quantized: these checks come first
    path = tmp_path / "m.onnx"
    for opset in ("21", None, 21.0):
        with pytest.raises(ExportError, match=f"opset {opset} is not supported"):
            export_onnx(model, path, opset=opset)
    for metadata, match in [({"a": object()}, "metadata entry 'a' is not JSON-ready"),
                            ([1], "metadata must be a dict"), ({3: "x"}, "metadata keys must be strings")]:  # fmt: skip
        with pytest.raises(ExportError, match=match):
            export_onnx(model, path, metadata=metadata)
    tmp_path.joinpath("folder.onnx").mkdir()
    with pytest.raises(ExportError, match=r"^the ONNX file \S*folder.onnx is a folder; give a file name$"):
        export_onnx(model, tmp_path / "folder.onnx")  # the Python API names no CLI flag
    with pytest.raises(ExportError, match="integer_levels must be True or False, got 'no'"):
        export_onnx(model, path, integer_levels="no")
    for cast, dtype in ((torch.nn.Module.double, "torch.float64"), (torch.nn.Module.half, "torch.float16")):
        with pytest.raises(ExportError, match=f"export the float32 quantized model \\(this one is {dtype}"):
            export_onnx(cast(copy.deepcopy(model)), path)
    with pytest.raises(ExportError, match="on the meta device"):
        export_onnx(copy.deepcopy(model).to("meta"), path)
    assert not path.exists()


def test_onnx_runner_checks_threads_and_images(tmp_path: Path) -> None:
    """onnxruntime refused threads=1.5 or "2" as if the file could not be loaded and took -1; wrong
    image shapes were its raw InvalidArgument, an empty batch a raw Fail, and uint8 pixels ran as
    they were: now one ExportError each."""
    path = tmp_path / "m.onnx"
    net = small_onnx(path)
    x = torch.randn(3, 3, 16, 16)
    runner = runner_refuses_bad_arguments(OnnxModel, path, x)
    with torch.no_grad():
        assert torch.allclose(runner(x), net(x), atol=1e-5) and runner(x).dtype == torch.float32
    assert torch.equal(runner(x.double()), runner(x))


def test_cli_evaluate_onnx_with_unusable_preprocess_metadata(tmp_path: Path, images: Path, capsys) -> None:
    """A file whose preprocess metadata lacks keys (export_onnx's ``metadata`` overrides dopq's own)
    stopped ``dopq evaluate --onnx`` with a raw TypeError from Preprocess."""
    path = tmp_path / "m.onnx"
    small_onnx(path)
    graph = onnx.load(str(path))
    entry = graph.metadata_props.add()
    entry.key, entry.value = "preprocess", json.dumps({"mean": [0.5, 0.5, 0.5]})
    onnx.save(graph, str(path))
    code = main(["evaluate", "--onnx", str(path), "--data", str(images), "--quiet", "--threads", "1"])
    _one_error(code, capsys.readouterr().err, "preprocess metadata is unusable")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_graph_beyond_the_protobuf_limit_keeps_its_tensors_in_one_data_file(
    dtype: str, images: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Beyond 2 GiB (a model of several billion weights) the export failed in protobuf after torch had
    written every tensor as a file named after it into the output folder; now the tensors go to one
    ``<name>.data`` beside the graph, which both runtimes and ``dopq evaluate --onnx`` read. The
    limit is lowered here to take that path on a tiny model."""
    model, x = _vit()
    x = x[:2]
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=4, a_bits=4), progress=False)
    monkeypatch.setattr("dopq.export.onnx_export.PROTOBUF_LIMIT", 100_000, raising=False)
    folder = tmp_path / "export"
    folder.mkdir()
    path = folder / "m.onnx"
    (folder / "m.onnx.data").write_bytes(b"an older export's data")
    report = export_onnx(model, path, float_dtype=dtype)
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "m.onnx.data"]  # nothing else left there
    graph = onnx.load(str(path), load_external_data=False)
    inline = [t.ByteSize() for t in graph.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert len(inline) < len(graph.graph.initializer) and max(inline) < 1200  # the weights are in the data
    assert report.bytes == path.stat().st_size + (folder / "m.onnx.data").stat().st_size
    x = x.double() if dtype == "float64" else x
    big = OnnxModel(path, threads=1)(x)
    if dtype == "float32":
        from dopq.export import OpenVinoModel

        assert torch.allclose(OpenVinoModel(path, threads=1)(x), big, atol=1e-3 * float(big.abs().max()))
    out = tmp_path / "e.json"
    argv = ["evaluate", "--onnx", str(path), "--data", str(images), "--quiet", "--threads", "1"]
    assert main([*argv, "--output", str(out)]) == 0, capsys.readouterr().err
    recorded = json.loads(out.read_text())  # the data file is part of what ran
    assert recorded["onnx_data_sha256"] == {"m.onnx.data": file_sha256(folder / "m.onnx.data")}
    monkeypatch.undo()  # the same model in one file: the same function, and the stale data file removed
    small = export_onnx(model, path, float_dtype=dtype)
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx"]
    assert (
        torch.equal(OnnxModel(path, threads=1)(x), big)
        and abs(report.bytes - small.bytes) < small.bytes // 10
    )


def test_float64_post_softmax_levels_are_one_where_per_threshold(tmp_path: Path) -> None:
    """The float64 form's post-Softmax levels: a ``Where`` per threshold taking the level itself.
    Each threshold's ``Cast -> Mul -> Add`` had onnxruntime hold about 16 float64 copies of the
    attention map at once (a DINOv2-L at 518 px: 4 GiB per image, the float64 simulation 1 GiB)."""
    model, x = _vit()
    dopq.quantize(model, x[:2], dopq.get_preset("dopq", w_bits=4, a_bits=4), progress=False)
    report = export_onnx(model, tmp_path / "m.onnx", float_dtype="float64")
    graph = onnx.load(report.path).graph
    producers = {out: n for n in graph.node for out in n.output}
    greater = [n for n in graph.node if n.op_type == "Greater"]
    readers = Counter(
        n.op_type for n in graph.node for i in n.input if i in producers and producers[i] in greater
    )
    attentions = sum(isinstance(m, QuantMatMul) for m in model.modules()) // 2
    assert readers == {"Where": 15 * attentions}, readers  # 4 bits: 15 thresholds, nothing but a Where
    y = OnnxModel(report.path, threads=1)(x.double())
    assert torch.equal(y, float64_copy(model)(x.double()))


def test_graphs_protobuf_cannot_serialize_are_sized_and_typed_without_it() -> None:
    """Beyond 2 GiB protobuf raises EncodeError from ``ByteSize`` and from the serialization inside
    shape inference (the float64 form's GELU rewrite): such a graph counts as too large for one
    message, and its types are inferred with the large tensors' data set aside, then restored."""
    from google.protobuf.message import EncodeError

    from dopq.export.float64_gelu import _inferred_types
    from dopq.export.onnx_export import _fits_one_message

    class Huge:
        def ByteSize(self) -> int:
            raise EncodeError("Failed to serialize proto")

    assert not _fits_one_message(Huge())
    w = numpy_helper.from_array(np.ones(2**18, dtype=np.float64), "w")  # 2 MiB: set aside
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, [2**18])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, [2**18])
    nodes = [onnx.helper.make_node("Add", ["x", "w"], ["s"]), onnx.helper.make_node("Erf", ["s"], ["y"])]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x], [y], [w]))
    typed = _inferred_types(onnx, model)
    assert {v.name: v.type.tensor_type.elem_type for v in typed.value_info} == {"s": onnx.TensorProto.DOUBLE}
    assert numpy_helper.to_array(model.graph.initializer[0]).sum() == 2**18  # the data is back


def test_the_export_trace_keeps_no_activations_for_a_backward(tmp_path: Path) -> None:
    """The exporter's traced forward ran with autograd on (the model's float parameters require
    grad), which saved every block's activations for a backward: a 12-block DINOv2-L at 518 px
    peaked at 8.4 GiB in the export."""
    model, x = _vit()
    dopq.quantize(model, x[:2], dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        export_onnx(model, tmp_path / "m.onnx")
    assert saved == []


def test_a_graph_and_a_saved_model_from_other_float_weights_are_not_compared(tmp_path: Path) -> None:
    """Same architecture and recipe, other float weights (another checkpoint, a colleague's
    fine-tune): evaluate --onnx --quantized compared them and its disagreement read as the export's.
    Both files record the SHA-256 of the weights they were made from."""
    from dopq.errors import ConfigError
    from dopq.reevaluate import _check_same_model

    model = timm.create_model("test_vit", pretrained=False, num_classes=2)
    cfg = dopq.get_preset("dopq", w_bits=4, a_bits=4)
    graph = {"arch": "test_vit", "recipe": cfg.to_dict(), "checkpoint_sha256": "a" * 64}
    with pytest.raises(ConfigError, match=r"was made from other float weights than --quantized q\.pt"):
        _check_same_model(graph, cfg, model, "q.pt", "m.onnx", {"checkpoint_sha256": "b" * 64})
    _check_same_model(graph, cfg, model, "q.pt", "m.onnx", {"checkpoint_sha256": "a" * 64})
    _check_same_model(graph, cfg, model, "q.pt", "m.onnx", {})  # random weights record none


def test_metadata_naming_another_class_count_than_the_graph_outputs_are_refused(
    tmp_path: Path, images: Path
) -> None:
    """The metadata are text anyone can edit: a class count the graph does not output refused good
    folders ('the model has 1 outputs') or passed folders that cannot be its classes."""
    from dopq.errors import ConfigError
    from dopq.reevaluate import evaluate_onnx

    path = tmp_path / "m.onnx"
    small_onnx(path)  # 10 logits
    graph = onnx.load(str(path))
    pre = {
        "input_size": [3, 16, 16],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
    }
    run = dict(eval_subset=2, batch_size=2, workers=0, threads=1, progress=False)
    for claimed, ok in ((1, False), (20, False), (10, True)):
        del graph.metadata_props[:]
        for key, value in (("preprocess", pre), ("num_classes", claimed)):
            entry = graph.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        onnx.save(graph, str(path))
        if ok:
            assert evaluate_onnx(path, str(images), **run)["eval_images"] == 2
        else:
            with pytest.raises(
                ConfigError, match=f"its metadata say {claimed} classes, its graph outputs 10 logits"
            ):
                evaluate_onnx(path, str(images), **run)
