"""OpenVINO as a second runtime: the exported W8/A8 graph runs every Linear and every product of two
activations on OpenVINO's integer kernels (read from its compiled runtime model), onnxruntime still
fuses it into integer ops, both agree, and ``dopq evaluate --runtime openvino`` and its errors."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import onnx
import pytest
import timm
import torch
from torch import nn

import dopq
from conftest import runner_refuses_bad_arguments, small_onnx
from conftest import tiny_swin as _swin
from conftest import tiny_vit as _vit
from dopq.cli import main
from dopq.export import (
    INTEGER_OPS,
    OnnxModel,
    OpenVinoModel,
    export_onnx,
    inexact_here,
    load_runtime,
    openvino_layer_precisions,
    openvino_layers,
    optimized_op_counts,
    to_deploy,
)
from dopq.export.linear import DeployLinear, symmetric_weights
from dopq.export.matmul import DeployMatMul
from dopq.export.openvino_runtime import compile_model
from dopq.export.symbolic import int8_shift
from dopq.models import qkv_paths
from dopq.modules import QuantLinear, QuantMatMul
from dopq.quantizers import UniformQuantizer, build_quantizer
from dopq.quantizers.uniform import TIE_NUDGE, TIE_SHARE, tie_share

pytest.importorskip("openvino")

INTEGER = {"u8", "i8"}


def _count(modules: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in modules.modules())


def _row_sum_products(model: nn.Module) -> int:
    """Linears whose OpenVINO weights are shifted: each adds a ones product for its input's row sums."""
    deploy = to_deploy(model, target="openvino")
    return sum(symmetric_weights(m.weight) for m in deploy.modules() if isinstance(m, DeployLinear))


def _signed_left_operands(model: nn.Module) -> int:
    """Products whose left operand the openvino form stores in int8 (its centred codes fit)."""
    return sum(
        isinstance(m.quantizer_a, UniformQuantizer)
        and int8_shift(int(m.quantizer_a.zero_point), m.quantizer_a.bits) == 0
        for m in model.modules()
        if isinstance(m, QuantMatMul)
    )


def _shifted_swin() -> tuple[nn.Module, torch.Tensor]:
    """``tiny_swin`` with a second block in the first stage: a shifted window (the only one; the
    second stage is one window), whose attention adds the shift mask and whose output is rolled back."""
    kwargs = dict(img_size=56, depths=(2, 1), num_heads=(1, 2), embed_dim=32, num_classes=10)
    return timm.create_model("swin_tiny_patch4_window7_224", **kwargs).eval(), torch.randn(8, 3, 56, 56)


@pytest.mark.parametrize("make", [_vit, _swin, _shifted_swin], ids=["vit", "swin", "shifted-swin"])
def test_openvino_runs_every_linear_and_product_on_integer_kernels(make, tmp_path: Path) -> None:
    model, x = make()
    dopq.quantize(
        model, x, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False
    )  # uniform post-Softmax
    path = export_onnx(model, tmp_path / "m.onnx", target="openvino").path
    layers = openvino_layers(path)
    linears = [precision for kind, precision, _ in layers if kind == "FullyConnected"]
    # every Linear (head included) is a FullyConnected on u8 x i8, and so is the row-sum product
    # (with int8 ones) of each Linear with shifted weights
    assert _row_sum_products(model) > 0
    assert len(linears) == _count(model, QuantLinear) + _row_sum_products(model), layers
    assert set(linears) <= INTEGER, layers
    # q @ k^T and attn @ v too: every MatMul of the file runs in an integer layer (a MatMul, or a
    # Subgraph where OpenVINO fused an attention's products and Softmax)
    import onnx

    matmuls = {n.name for n in onnx.load(path).graph.node if n.op_type == "MatMul"}
    assert len(matmuls) == _count(model, QuantMatMul) + len(linears)
    on_integers = {name for _, precision, names in layers if precision in INTEGER for name in names}
    assert matmuls <= on_integers, sorted(matmuls - on_integers)
    # the same graph still runs on onnxruntime's integer kernels, the row sums too; onnxruntime has
    # none for int8 x int8 products, the form of those whose left operand is centred on code 128
    ops = optimized_op_counts(path)
    assert ops.get("MatMul", 0) <= _signed_left_operands(model) and ops.get("Gemm", 0) == 0, ops
    assert sum(n for op, n in ops.items() if op in INTEGER_OPS) >= _count(model, QuantLinear), ops
    # the two runtimes agree (their integer products are exact on VNNI / AMX CPUs; without VNNI
    # both add u8 x i8 pairs in saturating 16 bits, so the exact check is the deploy form's, below)
    ov, ort = OpenVinoModel(path, threads=1)(x), OnnxModel(path, threads=1)(x)
    assert float((ov - ort).abs().max()) <= 0.05 * float(ort.abs().max())
    assert (ov.argmax(1) == ort.argmax(1)).float().mean() >= 0.875


def test_openvino_runs_dopq_w4a4_tanq_without_transcendental_ops(tmp_path: Path) -> None:
    """The paper's recipe (TanQ post-Softmax) in OpenVINO: counted codes, no Tan/Atan layer in the
    compiled model, every Linear and q @ k^T on integer kernels, the simulation's predictions."""
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=4, a_bits=4), progress=False)
    path = export_onnx(model, tmp_path / "m.onnx", target="openvino").path
    layers = openvino_layer_precisions(path)
    kinds = {kind for kind, _ in layers}
    linears = [precision for kind, precision in layers if kind == "FullyConnected"]
    assert "Math" not in kinds, layers  # OpenVINO's reference kernels for Tan / Atan
    assert linears.count("u8") + linears.count("i8") >= _count(model, QuantLinear), layers
    assert len(linears) == _count(model, QuantLinear) + _row_sum_products(model), layers
    with torch.no_grad():
        simulated = model(x)
    ov = OpenVinoModel(path, threads=1)(x)
    assert (ov.argmax(1) == simulated.argmax(1)).float().mean() >= 0.75


@pytest.mark.parametrize("softmax", ["uniform", "tanq"])
def test_symmetric_products_compute_each_simulated_layer(softmax: str) -> None:
    # W8/A8: zero points become shifts of the stored codes whose share each product subtracts; layer
    # by layer (a whole W8 network moves a code now and then, from float rounding, docs/export.md)
    model, x = _vit()
    config = dopq.get_preset("dopq", w_bits=8, a_bits=8, softmax_quantizer=softmax)
    dopq.quantize(model, x, config, progress=False)
    deploy = to_deploy(model, target="openvino")
    shifts = 0
    torch.manual_seed(1)
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            inputs: tuple[torch.Tensor, ...] = (torch.randn(2, 5, layer.in_features),)
            shifts += int(deploy.get_submodule(name).weight.zero_point.ne(0).sum())
        elif isinstance(layer, QuantMatMul):  # a non-negative left operand fits q @ k^T and attn @ v
            inputs = (torch.rand(2, 3, 5, 8), torch.randn(2, 3, 8, 5))
        else:
            continue
        with torch.no_grad():
            simulated, deployed = layer(*inputs), deploy.get_submodule(name)(*inputs)
        assert torch.allclose(deployed, simulated, atol=1e-5 * float(simulated.abs().max())), name
    assert shifts > 0  # the corrections were exercised


def test_openvino_row_sums_are_products_not_reduce_sums(tmp_path: Path) -> None:
    """W8 weights whose centred codes do not fit int8 are stored shifted, their share subtracted
    through the input's row sums (up to W4 the graph centres them instead).
    OpenVINO lowered ``ReduceSum`` of a quantized input to its integer type, where the real
    Swin-Tiny's W4/A4 sums wrapped (16 % top-1, logits 1.5x their range off the simulation; with
    the sums as ones ``MatMul``s 0.07, onnxruntime 0.07). Small random models do not show it, so
    this checks the form; ``test_symmetric_products_compute_each_simulated_layer`` its values."""
    import onnx

    model, x = _vit()
    with torch.no_grad():  # fc1 rows mostly positive: zero points near code 0, shifts needed
        for block in model.blocks:
            w = block.mlp.fc1.weight
            w.abs_().sub_(0.1 * w.amax(1, keepdim=True))
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    graph = onnx.load(export_onnx(model, tmp_path / "m.onnx", target="openvino").path).graph
    shifted = _row_sum_products(model)
    reduced = {node.input[0] for node in graph.node if node.op_type == "ReduceSum"}
    linear_inputs = {
        node.input[0] for node in graph.node if node.op_type == "MatMul" and "/mlp/" in node.name
    }
    assert shifted > 0 and linear_inputs and not reduced & linear_inputs


def test_load_runtime_picks_the_runtime(tmp_path: Path) -> None:
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    path = export_onnx(model, tmp_path / "m.onnx", metadata={"note": "kept"}).path
    ov = load_runtime(path, "openvino", threads=1)
    assert isinstance(ov, OpenVinoModel) and ov.metadata()["note"] == "kept"
    assert isinstance(load_runtime(path, "onnxruntime", threads=1), OnnxModel)
    with pytest.raises(dopq.errors.ExportError, match="unknown runtime"):
        load_runtime(path, "tensorrt")
    with pytest.raises(dopq.errors.ExportError, match="unknown export target"):
        export_onnx(model, tmp_path / "t.onnx", target="tensorrt")
    with pytest.raises(dopq.errors.ExportError, match="float32 graph"):
        export_onnx(model, tmp_path / "t.onnx", target="openvino", float_dtype="float64")


def test_onnxruntime_target_keeps_zero_points_and_exact_uint8_weights_on_request(tmp_path: Path) -> None:
    """The onnxruntime graph has no row-sum corrections; with ``weight_type="uint8"`` its 8-bit
    weights are uint8 (exact uint8 x uint8 products where uint8 x int8 would saturate, on CPUs
    without VNNI)."""
    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=8, a_bits=8), progress=False)
    ort_report = export_onnx(model, tmp_path / "ort.onnx", weight_type="uint8")
    ov_report = export_onnx(model, tmp_path / "ov.onnx", target="openvino")
    # OpenVINO's Linear weights are symmetric int8, its patch-embedding convolution's int8 with zero points
    assert (ort_report.weight_storage, ov_report.weight_storage) == ("uint8", "int8")
    assert ov_report.target == "openvino"
    with pytest.raises(dopq.errors.ExportError, match="int8 weights"):
        export_onnx(model, tmp_path / "bad.onnx", target="openvino", weight_type="uint8")
    import onnx

    ops = [{n.op_type for n in onnx.load(r.path).graph.node} for r in (ort_report, ov_report)]
    assert "ReduceSum" not in ops[0] and "ReduceSum" in ops[1]  # the products' zero-point shares
    ort, ov_graph_on_ort = OnnxModel(ort_report.path, threads=1)(x), OnnxModel(ov_report.path, threads=1)(x)
    with torch.no_grad():
        simulated = model(x)
    # the onnxruntime graph tracks the simulation on every CPU; both graphs compute one function
    assert float((ort - simulated).abs().max()) <= 0.05 * float(simulated.abs().max())
    assert (ov_graph_on_ort.argmax(1) == ort.argmax(1)).float().mean() >= 0.75


# --- command line ------------------------------------------------------------------------------


def _one_error(code: int, err: str, match: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("dopq: error: "), err
    assert match in lines[0], lines[0]


@pytest.fixture(scope="module")
def exported(image_folder, tmp_path_factory) -> tuple[Path, Path, Path]:
    images = image_folder("openvino-data", per_class=3, size=32, ext="png")
    out = tmp_path_factory.mktemp("ov")
    onnx_path, saved = out / "m.onnx", out / "q.pt"
    argv = ["quantize", "--model", "test_vit", "--data", str(images), "--calib-size", "4", "--quiet",
            "--w-bits", "8", "--a-bits", "8", "--save", str(saved), "--export", str(onnx_path),
            "--export-target", "openvino"]  # fmt: skip
    assert main(argv) == 0
    return images, onnx_path, saved


def test_cli_evaluates_with_openvino(exported, tmp_path: Path, capsys) -> None:
    images, onnx_path, saved = exported
    out = tmp_path / "ev.json"
    argv = ["evaluate", "--onnx", str(onnx_path), "--quantized", str(saved), "--data", str(images),
            "--runtime", "openvino", "--threads", "1", "--quiet", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert "on openvino" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["runtime"] == "openvino" and result["versions"]["openvino"]
    assert result["eval_images"] == 6 and result["comparison"]["images"] == 6  # beside the simulation
    assert "Runtime: openvino (1 thread)" in out.with_suffix(".md").read_text()


def test_cli_runtime_errors(exported, capsys, monkeypatch) -> None:
    images, onnx_path, _ = exported
    base = ["evaluate", "--onnx", str(onnx_path), "--data", str(images)]
    _one_error(main([*base, "--runtime", "tensorrt"]), capsys.readouterr().err, "invalid choice: 'tensorrt'")
    _one_error(main(["evaluate", "--quantized", "q.pt", "--data", str(images), "--runtime", "openvino"]),
               capsys.readouterr().err, "--runtime is for --onnx")  # fmt: skip
    monkeypatch.setitem(sys.modules, "openvino", None)  # import fails as if not installed
    _one_error(
        main([*base, "--runtime", "openvino"]), capsys.readouterr().err, "pip install 'dopq[openvino]'"
    )


def test_openvino_refuses_a_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(dopq.errors.ExportError, match="OpenVINO cannot load"):
        OpenVinoModel(bad)


def test_openvino_says_why_it_refuses_a_file(tmp_path: Path) -> None:
    """OpenVINO's messages open with the C++ frames they passed: the error said only 'Exception from
    src/inference/src/cpp/core.cpp:84:', not that the graph's data file lies outside its folder."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(torch.arange(512.0).numpy(), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512])],
        [weight],
    )
    (tmp_path / "model").mkdir()
    path = tmp_path / "model" / "m.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="w.data")
    (tmp_path / "model" / "w.data").rename(tmp_path / "outside.data")
    model = onnx.load(str(path), load_external_data=False)
    next(e for e in model.graph.initializer[0].external_data if e.key == "location").value = "../outside.data"
    onnx.save(model, str(path))
    for bad in (path, tmp_path / "bad.onnx"):
        (tmp_path / "bad.onnx").write_bytes(b"not onnx")
        with pytest.raises(dopq.errors.ExportError, match="OpenVINO cannot load") as caught:
            OpenVinoModel(bad)
        assert "Exception from" not in str(caught.value) and "failed at src" not in str(caught.value)
    with pytest.raises(dopq.errors.ExportError, match=r"outside\.data"):
        OpenVinoModel(path)


def test_openvino_compiles_each_batch_shape_and_computes_the_dynamic_graphs_function(exported) -> None:
    """Static shapes (OpenVINO fuses element-wise chains only with them): one compiled model per
    input shape, the predictions of the model compiled with a dynamic batch."""
    _, onnx_path, _ = exported
    x = torch.randn(5, 3, 160, 160)
    static, dynamic = (
        OpenVinoModel(onnx_path, threads=1),
        OpenVinoModel(onnx_path, threads=1, static_shapes=False),
    )
    out = torch.cat([static(x[:3]), static(x[3:]), static(x[:3])])
    assert sorted(static._by_shape) == [(2, 3, 160, 160), (3, 3, 160, 160)]
    reference = torch.cat([dynamic(x[:3]), dynamic(x[3:]), dynamic(x[:3])])
    assert list(dynamic._by_shape) == [None]
    # fused kernels round differently: an 8-bit code may flip, never the function
    assert torch.equal(out.argmax(1), reference.argmax(1))
    assert float((out - reference).abs().max()) <= 0.05 * float(reference.abs().max())


def test_cli_refuses_uint8_weights_for_openvino(exported, tmp_path: Path, capsys) -> None:
    images, _, _ = exported
    argv = ["quantize", "--model", "test_vit", "--data", str(images), "--calib-size", "4", "--quiet",
            "--export", str(tmp_path / "m.onnx"), "--export-target", "openvino",
            "--export-weight-type", "uint8"]  # fmt: skip
    _one_error(main(argv), capsys.readouterr().err, "takes int8 weights")


@pytest.mark.parametrize("w_bits", [8, 4])
def test_symmetric_weights_export_without_row_sums_or_weight_zero_points(w_bits: int, tmp_path: Path) -> None:
    """``symmetric_weights``: the openvino form needs no row-sum product (every Linear one integer
    FullyConnected), the onnxruntime form stores the codes without zero points; both compute the
    simulation's function."""
    import onnx

    model, x = _vit()
    config = dopq.get_preset("dopq", w_bits=w_bits, a_bits=8, symmetric_weights=True)
    dopq.quantize(model, x, config, progress=False)
    assert _row_sum_products(model) == 0
    ov_path = export_onnx(model, tmp_path / "ov.onnx", target="openvino").path
    linears = [p for kind, p, _ in openvino_layers(ov_path) if kind == "FullyConnected"]
    assert len(linears) == _count(model, QuantLinear) and set(linears) <= INTEGER, linears
    # no zero-point input at all (OpenVINO took an all-zero one as weights with zero points: float kernels)
    graph = onnx.load(ov_path).graph
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and "weight.codes" in n.input[0]]
    assert len(weights) == _count(model, QuantLinear) + 1 and all(len(n.input) == 2 for n in weights)
    # int8 (the default on CPUs with VNNI; uint8 codes always carry their zero points)
    ort_path = export_onnx(model, tmp_path / "ort.onnx", weight_type="int8").path
    ort_graph = onnx.load(ort_path).graph
    weights = [n for n in ort_graph.node if n.op_type == "DequantizeLinear" and "weight.codes" in n.input[0]]
    assert len(weights) == _count(model, QuantLinear) + 1
    # zero points all zero (onnxruntime's QGemm fusion wants the input, DeployLinear.with_zero_points)
    deployed = [m for m in to_deploy(model, weight_type="int8").modules() if isinstance(m, DeployLinear)]
    assert len(deployed) == _count(model, QuantLinear) and not any(m.weight.has_zero_points for m in deployed)
    with torch.no_grad():
        simulated = model(x)
    for path in (ov_path, ort_path):
        if inexact_here(path):  # 8-bit weights in int8: exact on CPUs with VNNI only
            continue
        out = OpenVinoModel(path, threads=1)(x) if path == ov_path else OnnxModel(path, threads=1)(x)
        assert float((out - simulated).abs().max()) <= 0.05 * float(simulated.abs().max())


def test_openvino_runs_shifted_4bit_weights_on_integer_kernels_without_row_sums(tmp_path: Path) -> None:
    """Asymmetric 4-bit weights (the dopq preset at W4/A8): ``q - z`` fits int8 but not always INT4,
    so the file keeps the shifted INT4 codes and the graph centres them with an int8 ``Sub`` that
    OpenVINO folds: every Linear and the patch embedding one integer layer, no row-sum product, the
    simulation's function."""
    import onnx

    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("dopq", w_bits=4, a_bits=8), progress=False)
    assert _row_sum_products(model) == 0
    report = export_onnx(model, tmp_path / "m.onnx", target="openvino")
    assert report.weight_storage == "int4"
    graph = onnx.load(report.path).graph
    subs = [n for n in graph.node if n.op_type == "Sub" and n.output[0].endswith("_centred")]
    weights = [n for n in graph.node if n.op_type == "DequantizeLinear" and "weight.codes" in n.input[0]]
    assert subs and all(len(n.input) == 2 for n in weights)  # no weight zero point left
    layers = openvino_layers(report.path)
    linears = [p for kind, p, _ in layers if kind == "FullyConnected"]
    convolutions = [p for kind, p, _ in layers if kind == "Convolution"]
    assert len(linears) == _count(model, QuantLinear) and set(linears) <= INTEGER, layers
    assert convolutions and set(convolutions) <= INTEGER, layers
    with torch.no_grad():
        simulated = model(x)
    out = OpenVinoModel(report.path, threads=1)(x)  # 4-bit weights: exact products on any x86 CPU
    assert float((out - simulated).abs().max()) <= 0.05 * float(simulated.abs().max())


@pytest.mark.parametrize("make", [_vit, _swin], ids=["vit", "swin"])
def test_centred_attention_operands_run_each_attention_as_one_integer_kernel(make, tmp_path: Path) -> None:
    """``symmetric_attention="qkv"``: q, k and v on grids centred on 0, so the openvino form's
    attention products need no zero-point corrections and OpenVINO fuses each attention's products
    and Softmax into one integer ``Subgraph``."""
    import onnx

    model, x = make()
    config = dopq.get_preset("recommended", w_bits=8, a_bits=8)  # qkv, v centred on its mean first
    assert config.symmetric_attention == "qkv" and config.centre_values
    dopq.quantize(model, x, config, progress=False)
    matmuls = [m for m in model.modules() if isinstance(m, QuantMatMul)]
    operands = [q for m in matmuls for q in (m.quantizer_a, m.quantizer_b) if q.symmetric]
    assert len(operands) == 3 * len(matmuls) // 2  # q, k, v; the post-Softmax map keeps its grid
    assert all(float(q.zero_point) == 128 for q in operands)
    path = export_onnx(model, tmp_path / "m.onnx", target="openvino").path
    graph = onnx.load(path).graph
    assert not [n for n in graph.node if n.op_type == "ReduceSum"]  # no zero-point share to remove
    layers = openvino_layers(path)
    fused = [
        (kind, precision) for kind, precision, _ in layers if kind == "Subgraph" and precision in INTEGER
    ]
    assert len(fused) == len(matmuls) // 2, layers
    # (a fused Subgraph does not name the q @ k^T it took in, so count instead of tracing names)
    assert not [kind for kind, precision, _ in layers if kind == "MatMul" and precision not in INTEGER], (
        layers
    )
    linears = [precision for kind, precision, _ in layers if kind == "FullyConnected"]
    assert len(linears) == _count(model, QuantLinear) and set(linears) <= INTEGER, layers
    # onnxruntime's own form keeps uint8 codes with zero point 128, which it fuses: no float MatMul
    # (the head's product on a 2-D input is a float Gemm there in any form, docs/export.md)
    ort_ops = optimized_op_counts(export_onnx(model, tmp_path / "ort.onnx").path)
    assert ort_ops.get("MatMul", 0) == 0, ort_ops
    if not inexact_here(path):  # 8-bit weights in int8: exact on CPUs with VNNI
        with torch.no_grad():
            simulated = model(x)
        out = OpenVinoModel(path, threads=1)(x)
        assert float((out - simulated).abs().max()) <= 0.05 * float(simulated.abs().max())


def test_centred_q_and_k_make_q_at_k_need_no_correction(tmp_path: Path) -> None:
    """``symmetric_attention="qk"`` centres q and k (not v): ``q @ k^T`` becomes an int8 x int8
    product without row or column sums, on OpenVINO's integer kernels; ``attn @ v`` keeps v's zero
    point and its correction."""
    import onnx

    model, x = _vit()
    config = dopq.get_preset("recommended", w_bits=4, a_bits=8, symmetric_attention="qk", centre_values=False)
    dopq.quantize(model, x, config, progress=False)
    qk = [m for name, m in model.named_modules() if isinstance(m, QuantMatMul) and name.endswith("matmul_qk")]
    av = [m for name, m in model.named_modules() if isinstance(m, QuantMatMul) and name.endswith("matmul_av")]
    assert qk and all(m.quantizer_a.symmetric and m.quantizer_b.symmetric for m in qk)
    assert av and not any(m.quantizer_b.symmetric for m in av)
    path = export_onnx(model, tmp_path / "m.onnx", target="openvino").path
    graph = onnx.load(path).graph
    reduced = [n.name for n in graph.node if n.op_type == "ReduceSum"]
    assert reduced and not [name for name in reduced if "matmul_qk" in name], reduced
    layers = openvino_layers(path)
    assert not [kind for kind, precision, _ in layers if kind == "MatMul" and precision not in INTEGER], (
        layers
    )
    with torch.no_grad():
        simulated = model(x)
    out = OpenVinoModel(path, threads=1)(x)  # 4-bit weights; attention's 8-bit pairs exact on VNNI
    assert float((out - simulated).abs().max()) <= 0.05 * float(simulated.abs().max())


def _stand_alone_fake_quantize_before_linears(path: Path) -> list[str]:
    """FakeQuantize layers OpenVINO kept as layers of their own between a Reshape / Transpose and a
    FullyConnected (a pooled or token-selected input, the head's, has no layer to fuse into)."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def kind(node) -> str:
        return node.get_rt_info()["layerType"].astype(str)

    return [
        op.get_friendly_name()
        for op in compiled.get_runtime_model().get_ordered_ops()
        if kind(op) == "FakeQuantize"
        and kind(op.input_value(0).get_node()) in ("Reshape", "Transpose")
        and any(kind(i.get_node()) == "FullyConnected" for i in op.output(0).get_target_inputs())
    ]


@pytest.mark.parametrize("make", [_vit, _swin], ids=["vit", "swin"])
def test_linear_inputs_are_quantized_before_the_token_rearrangements(
    make, tmp_path: Path, monkeypatch
) -> None:
    """The openvino form moves each Linear's per-tensor input Q/DQ above the reshapes and transposes
    before it (the heads' merge before proj, Swin's window partition before qkv): the same values
    (onnxruntime without graph optimizations gives identical logits), and OpenVINO fuses every such
    quantizer into the layer before instead of running it as a FakeQuantize of its own."""
    import onnxruntime as ort

    import dopq.export.onnx_export as onnx_export

    model, x = make()
    dopq.quantize(model, x, dopq.get_preset("recommended", w_bits=8, a_bits=8), progress=False)
    moved = export_onnx(model, tmp_path / "moved.onnx", target="openvino").path
    monkeypatch.setattr(onnx_export, "hoist_qdq", lambda graph: 0)
    kept = export_onnx(model, tmp_path / "kept.onnx", target="openvino").path
    assert _stand_alone_fake_quantize_before_linears(kept)  # the placement this fixes
    assert _stand_alone_fake_quantize_before_linears(moved) == []

    def logits(path: str):
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return session.run(None, {"images": x.numpy()})[0]

    assert (logits(moved) == logits(kept)).all()


def _ort_logits(path: str, x: torch.Tensor):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"images": x.numpy()})[0]


def _layer_precisions(path: str, kind: str) -> list[str]:
    return [p for k, p in openvino_layer_precisions(path) if k == kind]


@pytest.mark.parametrize("make", [_vit, _swin], ids=["vit", "swin"])
def test_q_k_and_v_share_one_int8_quantizer_on_the_qkv_output(make, tmp_path: Path, monkeypatch) -> None:
    """With 8-bit attention operands centred on 0, the openvino form gives q and k the scale of v
    (q's and k's rows of the qkv Linear and the attention scale rescaled: the same codes) and quantizes
    the qkv output once, before the heads are split: two Q/DQ pairs fewer per attention, the same
    logits as the form with three scales, and OpenVINO splits the heads in int8."""
    import dopq.export.onnx_export as onnx_export

    model, x = make()
    dopq.quantize(model, x, dopq.get_preset("recommended", w_bits=8, a_bits=8), progress=False)
    attentions = sum(isinstance(m, QuantMatMul) for m in model.modules()) // 2
    shared = export_onnx(model, tmp_path / "shared.onnx", target="openvino").path
    monkeypatch.setattr(onnx_export, "share_qkv_scales", lambda deploy, model: 0)
    apart = export_onnx(model, tmp_path / "apart.onnx", target="openvino").path

    def quantize_nodes(path: str) -> int:
        return sum(n.op_type == "QuantizeLinear" for n in onnx.load(path).graph.node)

    assert quantize_nodes(apart) - quantize_nodes(shared) == 2 * attentions
    a, b = _ort_logits(apart, x), _ort_logits(shared, x)
    assert abs(a - b).max() <= 1e-5 * abs(a).max() and (a.argmax(1) == b.argmax(1)).all()
    # and onnxruntime runs it with its graph optimizations too (an int8 pair before the heads'
    # transpose made it fail to load; the merged pair is stored in uint8)
    optimized = OnnxModel(shared, threads=1)(x).numpy()
    assert abs(optimized - b).max() <= 0.05 * abs(b).max()
    assert set(_layer_precisions(shared, "Split")) <= INTEGER
    assert "f32" in _layer_precisions(apart, "Split")  # what this changes


def test_qkv_scale_is_shared_only_where_the_codes_stay() -> None:
    """The deploy form with one q/k/v scale computes the same function (same codes, scales moved
    into the qkv rows and the attention scale); 4-bit operands (a Clip would keep the pairs apart)
    and a cosine attention (q and k normalised) keep their own scales."""
    from dopq.export.qkv_scale import share_qkv_scales

    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("recommended", w_bits=8, a_bits=8), progress=False)
    deploy = to_deploy(model, target="openvino")
    with torch.no_grad():
        before = deploy(x)
        assert share_qkv_scales(deploy, model) == _count(model, QuantMatMul) // 2
        after = deploy(x)
    assert torch.allclose(after, before, rtol=0, atol=1e-5 * float(before.abs().max()))
    for m in deploy.modules():
        if hasattr(m, "matmul_qk"):
            assert m.matmul_qk.qdq_a.scale == m.matmul_qk.qdq_b.scale == m.matmul_av.qdq_b.scale

    model, x = _vit()
    dopq.quantize(model, x, dopq.get_preset("recommended", w_bits=4, a_bits=4), progress=False)
    assert share_qkv_scales(to_deploy(model, target="openvino"), model) == 0
    kwargs = dict(embed_dim=32, depths=(1, 1), num_heads=(1, 2), img_size=64, window_size=8)
    v2 = timm.create_model("swinv2_tiny_window8_256", **kwargs).eval()
    dopq.quantize(v2, torch.randn(2, 3, 64, 64), progress=False)
    assert qkv_paths(v2) == {} and qkv_paths(model)


def _lattice_model() -> tuple[nn.Module, torch.Tensor]:
    """A tiny DeiT-III whose every parameter is perturbed (timm's zero biases and 1e-5 LayerScales
    would leave its blocks inert): at W2/A2 its ``attn @ v`` outputs, sums of a few products of
    2-bit levels and codes, lie on a lattice that the searched ``proj`` input range spans exactly."""
    torch.manual_seed(0)
    model = timm.create_model(
        "deit3_small_patch16_224", img_size=64, embed_dim=64, depth=2, num_heads=2, num_classes=10
    ).eval()
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return model, torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def test_openvino_computes_the_simulation_where_inputs_lie_on_a_lattice(tmp_path: Path) -> None:
    """OpenVINO rounds exact ties away from zero, torch and onnxruntime to even. With the searched
    ``proj`` input scales, a tenth of those inputs sat on ties, and OpenVINO's logits differed from
    the simulation's by up to the logits' spread on 13 of 16 images; the calibration now moves such a
    scale off its ties (``off_ties``), and both runtimes compute the simulated logits."""
    model, calib = _lattice_model()
    q = dopq.quantize(model, calib, dopq.get_preset("recommended", w_bits=2, a_bits=2), progress=False)
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, n=n: inputs.update({n: args[0]}))
        for n, m in q.named_modules()
        if isinstance(m, QuantLinear) and m.in_features == m.out_features  # attn.proj (fc2 is wider)
    ]
    with torch.no_grad():
        simulated = q(x)
    for h in hooks:
        h.remove()
    # the case is live: at the searched scale (before the move) the lattice sits on ties ...
    nudged = [q.get_submodule(n).input_quantizer for n in inputs]
    before = [tie_share(inputs[n], m.scale / (1 + TIE_NUDGE)) for n, m in zip(inputs, nudged, strict=True)]
    assert max(before) > 0.05, before
    # ... and not at the scale installed
    assert all(tie_share(inputs[n], m.scale) <= TIE_SHARE for n, m in zip(inputs, nudged, strict=True))
    for target in ("openvino", "onnxruntime"):
        path = export_onnx(q, tmp_path / f"{target}.onnx", target=target).path
        for runtime in (OpenVinoModel(path, threads=1), OnnxModel(path, threads=1)):
            assert float((runtime(x) - simulated).abs().max()) <= 1e-4 * float(simulated.std())


def test_openvino_takes_the_v_codes_of_a_float_attention_product_exactly(tmp_path: Path) -> None:
    """``attn @ v`` over float post-Softmax levels is a float MatMul in OpenVINO. Its ``v`` pair
    without zero point (int8, the integer products' form) ran as a stand-alone ``FakeQuantize``, whose
    float32 rounding of ``x / s + 128`` moved codes up to ~1e-5 of a step from a boundary and left
    values ~1e-5 of a step off the grid (DeiT-Tiny W3/A3: 91.8 % of the predictions identical to the
    simulation, onnxruntime 97.4 %). Below 8 bits ``v`` keeps its uint8 codes clipped on the codes:
    with ``v`` within 1e-5 of a step of its boundaries, OpenVINO gives the simulated product."""
    gen = torch.Generator().manual_seed(0)
    layer = QuantMatMul(build_quantizer("tanq", 3, objective="mse", grid_bits=16), UniformQuantizer(3))
    for q in (layer.quantizer_a, layer.quantizer_b):
        q.observing = True
    layer(
        torch.softmax(torch.randn(1, 2, 64, 64, generator=gen) * 3, -1),
        torch.randn(1, 2, 64, 32, generator=gen),
    )
    for q in (layer.quantizer_a, layer.quantizer_b):
        q.observing = False
    s, z = float(layer.quantizer_b.scale), int(layer.quantizer_b.zero_point)
    k = torch.randint(0, 7, (1, 2, 64, 32), generator=gen).double()
    sign = torch.randint(0, 2, k.shape, generator=gen).double() * 2 - 1
    delta = sign * 10 ** (-6.0 + torch.rand(k.shape, generator=gen, dtype=torch.float64))
    v = ((k - z + 0.5 + delta) * s).float()  # 10^-6 to 10^-5 steps from a boundary: above float32 noise
    attn = torch.eye(64).expand(1, 2, 64, 64)  # a softmax of far-apart logits: exactly 1 and 0
    deploy = DeployMatMul(layer, "attn", integer_levels=False, target="openvino")
    path = tmp_path / "av.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            deploy, (attn, v), str(path), dynamo=False, opset_version=21, input_names=["a", "b"]
        )
    compiled = compile_model(path, 1, None)
    out = torch.from_numpy(
        compiled.create_infer_request().infer({0: attn.numpy(), 1: v.numpy()})[compiled.output(0)]
    )
    with torch.no_grad():
        simulated = layer(attn, v)
    assert float((out - simulated).abs().max()) <= 1e-6 * float(simulated.abs().max())


def test_openvino_computes_an_rms_norm_model_with_a_pooled_head_as_the_simulation(tmp_path: Path) -> None:
    """AIMv2's layout (RMS norms, the last before a mean over the tokens and the head's quantizer): in
    torch's order, ``x * rsqrt(mean(x^2) + eps) * w``, OpenVINO fused the norm into its RMS op and its
    logits left the simulation's by a few hundredths of their spread on most images."""
    torch.manual_seed(0)
    kwargs = dict(embed_dim=64, depth=2, num_heads=2, img_size=32, patch_size=8, num_classes=10)
    model = timm.create_model("aimv2_large_patch14_224", **kwargs).eval()
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    qmodel = dopq.quantize(
        model, torch.randn(8, 3, 32, 32), dopq.get_preset("recommended", w_bits=8, a_bits=8), progress=False
    )
    images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    export_onnx(qmodel, tmp_path / "q.onnx", target="openvino")
    with torch.no_grad():
        out = qmodel(images)
    per_image = (OpenVinoModel(tmp_path / "q.onnx", threads=1)(images) - out).abs().amax(1) / out.std()
    assert float(per_image.median()) < 1e-3


def test_openvino_runner_checks_threads_and_images_and_is_thread_safe(tmp_path: Path) -> None:
    """OpenVINO took threads=1.5 and refused -1 as if the file could not be loaded; a wrong image
    shape read as "OpenVINO cannot load" the file, and an empty batch aborted the process. Two threads
    sharing the runner's one infer request per shape got each other's logits."""
    import threading

    path = tmp_path / "m.onnx"
    net = small_onnx(path)
    x = torch.randn(16, 3, 16, 16)
    runner = runner_refuses_bad_arguments(OpenVinoModel, path, x)
    with torch.no_grad():
        reference = net(x)
    outputs: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        for _ in range(20):
            outputs[i] = runner(x[4 * (i % 4) : 4 * (i % 4) + 4])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "the runner hung with two threads in it"
    for i, out in outputs.items():
        assert torch.allclose(out, reference[4 * (i % 4) : 4 * (i % 4) + 4], atol=1e-4), i
