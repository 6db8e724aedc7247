"""Write the deploy form of a quantized model as an ONNX graph in QDQ form.

The graph comes from torch's TorchScript exporter (``dynamo=False``: the quantization steps are
autograd Functions with ONNX symbolics) and is then post-processed with the ``onnx`` package:

* 4-bit weights (W <= 4) are stored as INT4 initializers (opset >= 21), each behind a ``Cast`` to
  int8 that onnxruntime folds at load time, so that its integer MatMul kernels see int8 weights
  while the file holds two codes per byte. Below opset 21 they stay int8.
* in the openvino form, weight zero points leave ``DequantizeLinear`` (OpenVINO runs a product with
  them on float kernels): the codes are stored centred, or, where only the shifted codes fit INT4,
  centred by an int8 ``Sub`` of two constants that OpenVINO folds at compile time; a Linear's
  per-tensor input Q/DQ pair moves above the reshapes and transposes before it
  (:mod:`dopq.export.qdq_placement`), where OpenVINO fuses it into the layer before; and an
  attention's 8-bit q, k and v share one scale (:mod:`dopq.export.qkv_scale`, the same codes) and
  one Q/DQ pair on the ``qkv`` Linear's output, which OpenVINO fuses into that Linear.
* each post-Softmax cell table (65537 float32 levels at the default grid) is stored as its levels and
  the cells where its code steps up (a table that is not monotone: a code per cell), rebuilt by nodes
  on constants that the runtime folds into the float table when it loads the model.
* initializers no node reads are dropped; the recipe, preprocessing and provenance go into the
  model's metadata (``metadata_props``), which ``dopq evaluate --onnx`` reads back.
* the file is written under a temporary name and renamed, so an interrupted export leaves nothing.
  A graph beyond protobuf's 2 GiB limit of one message (several billion weights: INT4 codes are
  int8 when traced) keeps its tensors in one data file beside it, ``<name>.data``
  (ONNX external data, which onnxruntime and OpenVINO read from the graph's folder).
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dopq.config import FLOAT_DTYPES
from dopq.errors import ExportError
from dopq.export.deploy import to_deploy
from dopq.export.float64_gelu import exact_float64_gelu
from dopq.export.linear import DeployLinear, WeightCodes
from dopq.export.qdq_placement import hoist_qdq, merge_split_qdq
from dopq.export.qkv_scale import share_qkv_scales
from dopq.export.symbolic import CONTRIB_DOMAIN
from dopq.files import check_output_path, scratch_dir
from dopq.models import example_input
from dopq.models.loading import as_dopq_model, model_preprocess, weights_dtype
from dopq.modules import QuantLinear
from dopq.quantizers import Quantizer

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "ExportReport", "check_export_target", "export_onnx", "require_onnx"]

DEFAULT_OPSET = 21
MIN_OPSET = 13  # per-axis DequantizeLinear
INT4_OPSET = 21  # INT4 tensors and Cast to/from them
MAX_OPSET = 21  # the highest this dopq version has checked with onnxruntime
INT4_RANGE = (-8, 7)
_TORCH_DTYPES = {name: getattr(torch, name) for name in FLOAT_DTYPES}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}
# protobuf's limit on one message: a larger graph is saved with its tensors in a data file
PROTOBUF_LIMIT = 2**31 - 1


def require_onnx() -> Any:
    """The ``onnx`` module, or a clear error when it is not installed."""
    try:
        import onnx
    except ImportError:
        raise ExportError("ONNX export needs the onnx package: pip install 'onnx>=1.19'") from None
    return onnx


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote."""

    path: str
    bytes: int
    opset: int
    weight_storage: str
    integer_levels: bool
    seconds: float
    float_dtype: str = "float32"
    target: str = "onnxruntime"

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_export_target(path: str | Path, opset: int) -> None:
    """Everything an export checks before it starts: onnx and onnxruntime installed, the opset, and
    a writable destination (so a long run does not fail at its end)."""
    require_onnx()
    from dopq.export.runtime import require_onnxruntime

    require_onnxruntime()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(
            f"opset {opset} is not supported: use {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})"
        )
    check_output_path(path, "the ONNX file", ExportError)  # the CLI checked its own flags first


def _initializers(graph: Any) -> dict[str, Any]:
    return {init.name: init for init in graph.initializer}


def _weight_slots(node: Any, inits: dict[str, Any]) -> tuple[int, ...]:
    """The (codes, zero points) inputs of a node that reads constant weight codes, or ():
    a per-axis DequantizeLinear (float32 form; codes alone when symmetric) or MatMulInteger's right
    operand (float64 form)."""
    if node.op_type == "DequantizeLinear" and any(a.name == "axis" for a in node.attribute):
        slots: tuple[int, ...] = (0, 2) if len(node.input) > 2 else (0,)
    elif node.op_type == "MatMulInteger":
        slots = (1, 3)
    elif node.op_type == "MatMulIntegerToFloat":  # com.microsoft: (a, b, a_scale, b_scale, a_zp, b_zp, bias)
        slots = (1, 5)
    elif node.op_type == "Sub":  # codes minus zero points, centred by the graph (openvino form)
        slots = (0, 1)
    else:
        return ()
    if len(node.input) <= max(slots) or not all(node.input[i] in inits for i in slots):
        return ()
    return slots


def _read_shared_constants_directly(model: Any) -> None:
    """Point the readers of ``Identity(initializer)`` at the initializer itself and drop the Identity.
    The TorchScript exporter stores equal constants once and reads the copies through Identity nodes
    (every 3-bit layer's all-zero weight zero points of one shape, say); the passes after this one
    recognise weights and tables only as initializers, so a copy read through an Identity would stay
    unpacked (a W3/A3 file kept most of its weights in int8 containers)."""
    graph = model.graph
    inits = _initializers(graph)
    outputs = {o.name for o in graph.output}
    alias = {}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits and node.output[0] not in outputs:
            alias[node.output[0]] = node.input[0]
    if not alias:
        return
    kept = [node for node in graph.node if node.output[0] not in alias]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in alias:
                node.input[i] = alias[name]
    del graph.node[:]
    graph.node.extend(kept)


def _fits_int4(*arrays: np.ndarray) -> bool:
    return all(a.dtype == np.int8 and INT4_RANGE[0] <= a.min() and a.max() <= INT4_RANGE[1] for a in arrays)


def _pack_int4_weights(model: Any) -> None:
    """Store weight codes and zero points that fit 4 bits as INT4 initializers (two per byte), each
    behind a Cast to int8 that onnxruntime folds at load time. An initializer read by several nodes
    (equal zero points, stored once) is packed once."""
    import ml_dtypes  # an onnx dependency: numpy's 4-bit types
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    nodes, as_int8 = [], {}
    for node in graph.node:
        slots = _weight_slots(node, inits)
        if slots:
            arrays = {slot: numpy_helper.to_array(inits[node.input[slot]]) for slot in slots}
            if _fits_int4(*arrays.values()):
                for slot, array in arrays.items():
                    name = node.input[slot]
                    if name not in as_int8:
                        as_int8[name] = f"{name}_as_int8"
                        graph.initializer.append(
                            numpy_helper.from_array(array.astype(ml_dtypes.int4), f"{name}_int4")
                        )
                        nodes.append(
                            onnx.helper.make_node(
                                "Cast", [f"{name}_int4"], [as_int8[name]], to=onnx.TensorProto.INT8
                            )
                        )
                    node.input[slot] = as_int8[name]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _factor_level_tables(model: Any, opset: int) -> None:
    """Store each post-Softmax cell table (the float ``GatherElements`` data of ``indexed_levels``,
    2^16 + 1 levels at the default grid) as its distinct levels and the code of every cell, rebuilt
    by nodes on constants that the runtime folds into the float table when it loads the model:
    a monotone table (TanQ's, every grid table) from the cells where its code steps up, any other
    from one code per cell."""
    import onnx

    graph = model.graph
    inits = _initializers(graph)
    nodes, factored = [], set()
    for node in graph.node:
        init = inits.get(node.input[0]) if node.op_type == "GatherElements" else None
        if init is not None and init.name in factored:  # one table read by two modules
            node.input[0] = f"{init.name}_table"
        elif init is not None and init.data_type == onnx.TensorProto.FLOAT:
            added = _table_from_codes(graph, init, opset, node)
            if added:
                factored.add(init.name)
            nodes += added
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _table_from_codes(graph: Any, init: Any, opset: int, reader: Any) -> list[Any]:
    """Where a table of few distinct values pays for it: add its levels and the nodes that give each
    cell's code, and point ``reader`` at ``Gather(levels, codes)``; returns the new nodes (none where
    the table stays as it is)."""
    import onnx
    from onnx import numpy_helper

    table = numpy_helper.to_array(init)
    levels, codes = np.unique(table, return_inverse=True)
    if len(levels) > 256 or table.size < 4 * len(levels):
        return []
    name = init.name
    graph.initializer.append(numpy_helper.from_array(levels.astype(np.float32), f"{name}_levels"))
    steps = np.diff(codes)
    if table.ndim == 1 and steps.min() >= 0 and steps.max() <= 1:
        made = _codes_from_steps(graph, name, len(codes), np.flatnonzero(steps) + 1)
    else:
        made = _stored_codes(graph, name, codes.reshape(table.shape), opset)
    reader.input[0] = f"{name}_table"
    return [
        *made,
        onnx.helper.make_node("Gather", [f"{name}_levels", f"{name}_index"], [f"{name}_table"], axis=0),
    ]


def _codes_from_steps(graph: Any, name: str, cells: int, steps: np.ndarray) -> list[Any]:
    """``{name}_index``, the code of each of ``cells`` cells of a monotone table whose code steps up by
    one at each cell of ``steps``: ``ReduceSum(cell > steps - 1)`` (``Greater``, which onnxruntime folds
    at every opset; ``GreaterOrEqual`` it left unfolded at opset 13), from ``2^b - 1`` numbers instead
    of one code per cell."""
    import onnx
    from onnx import numpy_helper

    make = onnx.helper.make_node
    graph.initializer.extend([
        numpy_helper.from_array(steps.astype(np.int32) - 1, f"{name}_steps"),  # cell > step - 1
        numpy_helper.from_array(np.array(0, np.int32), f"{name}_first"),
        numpy_helper.from_array(np.array(cells, np.int32), f"{name}_cells"),
        numpy_helper.from_array(np.array(1, np.int32), f"{name}_one"),
        numpy_helper.from_array(np.array([1], np.int64), f"{name}_axis"),
    ])  # fmt: skip
    return [
        make("Range", [f"{name}_first", f"{name}_cells", f"{name}_one"], [f"{name}_cell"]),
        make("Unsqueeze", [f"{name}_cell", f"{name}_axis"], [f"{name}_column"]),
        make("Greater", [f"{name}_column", f"{name}_steps"], [f"{name}_passed"]),
        make("Cast", [f"{name}_passed"], [f"{name}_counts"], to=onnx.TensorProto.INT32),
        make("ReduceSum", [f"{name}_counts", f"{name}_axis"], [f"{name}_index"], keepdims=0),
    ]


def _stored_codes(graph: Any, name: str, codes: np.ndarray, opset: int) -> list[Any]:
    """``{name}_index`` from one stored code per cell (UINT4 from opset 21 where they fit, else uint8)."""
    import ml_dtypes
    import onnx
    from onnx import numpy_helper

    code_type = ml_dtypes.uint4 if opset >= INT4_OPSET and codes.max() < 16 else np.uint8
    graph.initializer.append(numpy_helper.from_array(codes.astype(code_type), f"{name}_codes"))
    return [onnx.helper.make_node("Cast", [f"{name}_codes"], [f"{name}_index"], to=onnx.TensorProto.INT32)]


def _fits_int8(array: np.ndarray) -> bool:
    return int(array.min()) >= -128 and int(array.max()) <= 127


def _centre_weights(model: Any, opset: int) -> None:
    """Move the zero points of weight ``DequantizeLinear`` nodes into their codes where ``q - z`` fits
    int8: stored centred, or, where the codes and zero points fit INT4 but ``q - z`` does not, as an
    int8 ``Sub`` of the two constants (packed next), which OpenVINO folds when it compiles the model,
    so the product runs on its integer kernels."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inits = _initializers(graph)
    nodes = []
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and _weight_slots(node, inits) == (0, 2):
            codes, zero_points = (numpy_helper.to_array(inits[node.input[i]]) for i in (0, 2))
            shape = [1] * codes.ndim
            shape[next(a.i for a in node.attribute if a.name == "axis")] = -1
            zero_points = zero_points.reshape(shape)
            values = codes.astype(np.int16) - zero_points
            if codes.dtype == np.int8 and _fits_int8(values):
                name = node.input[0]
                if (
                    opset >= INT4_OPSET
                    and _fits_int4(codes, zero_points)
                    and not _fits_int4(values.astype(np.int8))
                ):
                    shift = f"{name}_zero_points"  # per weight: zero points may be shared
                    graph.initializer.append(numpy_helper.from_array(zero_points, shift))
                    nodes.append(onnx.helper.make_node("Sub", [name, shift], [f"{name}_centred"]))
                else:
                    graph.initializer.append(
                        numpy_helper.from_array(values.astype(np.int8), f"{name}_centred")
                    )
                node.input[0] = f"{name}_centred"
                del node.input[2]
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)


def _drop_unused_initializers(model: Any) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _set_metadata(model: Any, metadata: dict[str, Any]) -> None:
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = value if isinstance(value, str) else json.dumps(value)


def model_widths(model: nn.Module) -> dict[str, int | None]:
    """The recipe's ``w_bits`` / ``a_bits`` read from a quantized model: the widths most of its
    Linear layers' weights and inputs have (the patch embedding and the head may differ)."""
    weights: Counter[int] = Counter()
    inputs: Counter[int] = Counter()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            for slot, counts in ((module.weight_quantizer, weights), (module.input_quantizer, inputs)):
                if isinstance(slot, Quantizer):
                    counts[slot.bits] += 1
    return {
        "w_bits": weights.most_common(1)[0][0] if weights else None,
        "a_bits": inputs.most_common(1)[0][0] if inputs else None,
    }


def _model_metadata(model: nn.Module, integer_levels: bool, dtype: torch.dtype) -> dict[str, Any]:
    import dopq

    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = getattr(model, "class_names", None)  # a transformers config's id2label
    return {
        "arch": cfg.get("architecture"),
        "num_classes": getattr(model, "num_classes", None),
        **({"class_names": list(names)} if names else {}),  # `dopq evaluate --onnx` checks the folders
        **model_widths(model),  # `dopq evaluate --onnx` names them where no recipe was recorded
        "dopq_version": dopq.__version__,
        "integer_attention": integer_levels,
        "float_dtype": _DTYPE_NAMES[dtype],
        "preprocess": model_preprocess(model),  # what `dopq evaluate --onnx` feeds it
    }


def export_onnx(
    model: nn.Module,
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    integer_levels: bool = False,
    metadata: dict[str, Any] | None = None,
    float_dtype: str = "float32",
    target: str = "onnxruntime",
    weight_type: str | None = None,
) -> ExportReport:
    """Export a quantized model to ONNX (QDQ) for the integer kernels of onnxruntime or OpenVINO.

    Args:
        model: a model returned by :func:`dopq.quantize` (or ``load_quantized``), or the
            ``transformers`` model it quantized; it is not changed.
        path: the ``.onnx`` file to write (atomically).
        opset: ONNX opset, ``MIN_OPSET`` (13) to 21; 4-bit weights are stored as INT4 from 21.
        integer_levels: round post-Softmax levels to 8-bit fixed point so ``attn @ v`` is an integer
            MatMul too (see :class:`dopq.export.matmul.DeployMatMul`).
        metadata: JSON-ready entries stored in the model's ``metadata_props``.
        float_dtype: ``"float32"`` (QDQ for onnxruntime's fused integer kernels: the fast graph) or
            ``"float64"`` (float parts in float64, products as ``MatMulInteger``: it reproduces the
            simulation's codes, at a cost in speed; docs/export.md).
        target: ``"onnxruntime"`` or ``"openvino"``: the float32 graph shaped for that runtime's
            integer kernels (:func:`dopq.export.deploy.to_deploy`); the codes are the same.
        weight_type: ``"int8"`` or ``"uint8"``, the container of 8-bit weight codes for onnxruntime
            (:data:`dopq.export.deploy.WEIGHT_TYPES`: int8 is fast and exact on CPUs with VNNI,
            uint8 exact on CPUs without it); None: the exact one for this CPU in float32
            (:func:`dopq.export.deploy.default_weight_type`), uint8 in float64.

    Returns:
        An :class:`ExportReport`.
    """
    if float_dtype not in _TORCH_DTYPES:
        raise ExportError(f"float dtype must be one of {sorted(_TORCH_DTYPES)}, got {float_dtype!r}")
    if target == "openvino" and float_dtype != "float32":
        raise ExportError("the openvino target is a float32 graph; the float64 form is for onnxruntime")
    if not isinstance(integer_levels, bool):
        raise ExportError(f"integer_levels must be True or False, got {integer_levels!r}")
    # the transformers object dopq.quantize quantized in place: traced alone, it took a 224-pixel
    # example image and gave a graph of the wrong input size or an error from inside
    model = as_dopq_model(model)
    _check_model_weights(model)
    _check_metadata(metadata)
    check_export_target(path, opset)
    onnx = require_onnx()
    path = Path(path)
    t0 = time.perf_counter()
    dtype = _TORCH_DTYPES[float_dtype]
    deploy = to_deploy(model, integer_levels, dtype, target, weight_type)
    if target == "openvino":
        share_qkv_scales(deploy, model)
    example = example_input(model).cpu()
    # traced in a folder of its own: beyond 2 GiB torch writes every tensor as a file beside the
    # graph, named after the tensor, which had filled the output folder
    with scratch_dir(path) as work:
        traced = work / "traced" / "model.onnx"
        traced.parent.mkdir()
        _trace(deploy, example, traced, opset)
        graph = onnx.load(str(traced))  # with any tensors torch wrote beside it
        shutil.rmtree(traced.parent)
        _read_shared_constants_directly(graph)
        if target == "openvino":
            _centre_weights(graph, opset)
            merge_split_qdq(graph)
            hoist_qdq(graph)
        if opset >= INT4_OPSET:
            _pack_int4_weights(graph)
        _factor_level_tables(graph, opset)
        if dtype == torch.float64:
            exact_float64_gelu(graph)  # onnxruntime has no float64 erf
        _drop_unused_initializers(graph)
        storage = _weight_storage(graph)
        own = {**_model_metadata(model, integer_levels, dtype), "target": target, "weight_storage": storage}
        own["needs_vnni"] = any(m.needs_vnni for m in deploy.modules() if isinstance(m, WeightCodes))
        merged = {**own, **(metadata or {})}
        if isinstance(merged.get("preprocess"), dict):  # the size the graph takes, what `dopq evaluate
            # --onnx` feeds it: a dynamic_img_size model is traced at its img_size, not pretrained_cfg's
            merged["preprocess"] = {**merged["preprocess"], "input_size": list(example.shape[1:])}
        _set_metadata(graph, merged)
        written = work / path.name
        data = _save(onnx, graph, written)
        del graph
        if dtype == torch.float64:
            _check_loads(written, path)
        data_path = path.with_name(f"{path.name}.data")
        if data is not None:  # the data first: the graph that names it is the last file in place
            data.replace(data_path)
        else:  # a stale data file of an earlier, larger export of this name
            data_path.unlink(missing_ok=True)
        # one rename within the output's folder (the scratch folder lies there): an interrupted
        # export leaves no half file
        written.replace(path)
    seconds = time.perf_counter() - t0
    size = path.stat().st_size + (data_path.stat().st_size if data is not None else 0)
    return ExportReport(str(path), size, opset, storage, integer_levels, seconds, float_dtype, target)


def _fits_one_message(model: Any) -> bool:
    """Whether protobuf can serialize ``model`` (an ONNX ModelProto) as one message."""
    from google.protobuf.message import EncodeError

    try:
        return model.ByteSize() <= PROTOBUF_LIMIT
    except EncodeError:  # beyond 2 GiB protobuf cannot even size it
        return False


def _save(onnx: Any, graph: Any, path: Path) -> Path | None:
    """Check and write ``graph`` to ``path``; beyond :data:`PROTOBUF_LIMIT` its tensors go to one
    data file beside it, ``<name>.data``, whose path is returned (None: one self-contained file).
    Checking and serializing such a graph in memory fails in protobuf, so it is checked from disk."""
    if _fits_one_message(graph):
        onnx.checker.check_model(graph)
        onnx.save(graph, str(path))
        return None
    data = path.with_name(f"{path.name}.data")
    onnx.save(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    onnx.checker.check_model(str(path))
    return data


def _check_model_weights(model: nn.Module) -> None:
    """The export reads the float32 quantized model (its float64 form comes from ``float_dtype``):
    a model cast with ``.double()`` / ``.half()`` failed in the tracer, blaming the model, and one
    on the meta device with a raw error."""
    if next(model.parameters(), None) is None:
        return  # no weights: refused below as not quantized
    dtype = weights_dtype(model, ExportError)
    if dtype != torch.float32:
        raise ExportError(
            f"export the float32 quantized model (this one is {dtype}: call model.float()); "
            "float_dtype='float64' writes the float64 form"
        )


def _check_metadata(metadata: Any) -> None:
    """``metadata`` must be a dict of str keys and JSON-ready values: checked before any work (a bad
    entry was a TypeError from ``json`` or protobuf at the end of the export)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise ExportError(f"metadata must be a dict of JSON-ready entries, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise ExportError(f"metadata keys must be strings, got {key!r}")
        try:
            json.dumps(value)
        except (TypeError, ValueError) as exc:
            raise ExportError(f"metadata entry {key!r} is not JSON-ready: {exc}") from None


def _trace(deploy: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    """Write ``deploy`` as ONNX with torch's TorchScript exporter; what it cannot trace (an operator
    without an ONNX form at this opset, a float layer of another library) becomes an ExportError."""
    try:
        # no_grad: the tracer's forward would otherwise have autograd keep every block's activations
        # for a backward (the model's float parameters require grad): a 12-block DINOv2-L at 518 px
        # peaked at 8.4 GiB
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(
                deploy,
                (example,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["images"],
                output_names=["logits"],
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                custom_opsets=_contrib_opsets(deploy),
            )
    except Exception as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        raise ExportError(
            f"torch's ONNX exporter cannot trace this model: {type(exc).__name__}: {first}"
        ) from exc


def _contrib_opsets(deploy: nn.Module) -> dict[str, int]:
    """onnxruntime's contrib domain where a Linear exports as its ``MatMulIntegerToFloat``; none
    otherwise (the file stays standard ONNX, and the exporter warns of a domain it does not use)."""
    used = any(isinstance(m, DeployLinear) and m.contrib_product for m in deploy.modules())
    return {CONTRIB_DOMAIN: 1} if used else {}


def _weight_storage(model: Any) -> str:
    """The weight containers the file holds, read from its graph: ``int4`` (packed), ``int8``,
    ``uint8``, joined by ``+`` where layers differ (``int4+uint8``: 8-bit patch embedding and head,
    ``edge_w_bits``)."""
    import onnx

    graph = model.graph
    inits = _initializers(graph)
    # packed codes are read through a Cast of their INT4 initializer
    inits |= {
        n.output[0]: inits[n.input[0]] for n in graph.node if n.op_type == "Cast" and n.input[0] in inits
    }
    names = {onnx.TensorProto.INT4: "int4", onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8"}
    containers = set()
    for node in graph.node:
        slots = _weight_slots(node, inits)
        kind = names.get(inits[node.input[slots[0]]].data_type) if slots else None
        if kind is not None:  # None: not a weight, or the int32 bias codes
            containers.add(kind)
    return "+".join(sorted(containers))


def _check_loads(tmp: Path, path: Path) -> None:
    """onnxruntime must be able to run a float64 graph: a family with an op that has no float64
    kernel there (a rotary embedding's Sin, say) fails here, before the file is kept; the message
    names the file asked for, not the temporary one written first."""
    from dopq.export.runtime import OnnxModel

    try:
        OnnxModel(tmp, threads=1)
    except ExportError as exc:
        raise ExportError(f"{str(exc).replace(str(tmp), str(path))}; export in float32") from None
