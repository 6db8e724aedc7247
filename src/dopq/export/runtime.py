"""Run exported graphs with onnxruntime's CPU provider, as a torch module the evaluation loop can use;
:func:`load_runtime` picks onnxruntime or OpenVINO (:mod:`dopq.export.openvino_runtime`)."""

from __future__ import annotations

import json
import platform
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dopq.config import RUNTIMES
from dopq.errors import ExportError

__all__ = [
    "INTEGER_OPS",
    "RUNTIMES",
    "OnnxModel",
    "check_images",
    "check_threads",
    "inexact_here",
    "load_runtime",
    "logits_width",
    "onnx_metadata",
    "optimized_graph",
    "optimized_op_counts",
    "read_graph",
    "read_metadata",
    "require_onnxruntime",
    "saturating_cpu",
    "static_dims",
]


# onnxruntime ops that compute on integer codes (after its QDQ fusions)
INTEGER_OPS = frozenset(
    {
        "MatMulIntegerToFloat",
        "QLinearMatMul",
        "MatMulInteger",
        "DynamicQuantizeMatMul",
        "QLinearConv",
        "ConvInteger",
        "QGemm",
        "QAttention",
    }
)


def require_onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a clear error when it is not installed."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("running ONNX models needs onnxruntime: pip install onnxruntime") from None
    return onnxruntime


def check_threads(threads: Any) -> None:
    """A runtime's thread count: None or 0 (the runtime's default) or a positive int. Checked here:
    onnxruntime refused a float or a string as if the file could not be loaded, OpenVINO took 1.5 and
    refused -1 and True the same way, and onnxruntime took -1."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
        raise ExportError(f"threads must be an int >= 1 (0 or None: the runtime's default), got {threads!r}")


def check_images(images: Any, expected: tuple[int | None, ...], path: str) -> None:
    """``images`` for a graph whose input has ``expected`` shape (None: a free dimension, the batch):
    a non-empty float tensor of that shape, or one ExportError naming what differs. The runtimes
    stopped deep inside with their own errors (OpenVINO's read as if the file could not be loaded),
    took uint8 pixels as they were, and OpenVINO aborted the process on an empty batch."""
    if not isinstance(images, torch.Tensor):
        raise ExportError(f"{path} takes a torch.Tensor of images, got {type(images).__name__}")
    if not images.is_floating_point():
        raise ExportError(
            f"{path} takes float images (normalized as its metadata's preprocess says), got {images.dtype}"
        )
    wanted = ", ".join("batch" if d is None else str(d) for d in expected)
    shape = tuple(images.shape)
    if len(shape) != len(expected) or any(
        d is not None and d != n for d, n in zip(expected, shape, strict=True)
    ):
        raise ExportError(f"{path} takes images of shape ({wanted}), got {shape}")
    if shape and shape[0] == 0:
        raise ExportError(f"{path}: an empty batch (shape {shape}); give at least one image")


def static_dims(dims: Any) -> tuple[int | None, ...]:
    """An input's shape with every dimension that is not a fixed positive int as None (free)."""
    return tuple(d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None for d in dims)


def _session_options(threads: int | None, optimized_path: str | None = None, optimize: bool = True) -> Any:
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    level = "ORT_ENABLE_ALL" if optimize else "ORT_DISABLE_ALL"
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    options.log_severity_level = 3
    return options


def _session(
    path: str | Path, threads: int | None, optimized_path: str | None = None, optimize: bool = True
) -> Any:
    ort = require_onnxruntime()
    check_threads(threads)  # before the loader, whose error would blame the file
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model {path} does not exist")
    try:
        return ort.InferenceSession(
            str(path), _session_options(threads, optimized_path, optimize), providers=["CPUExecutionProvider"]
        )
    except Exception as exc:  # any loader failure means the file is unusable
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"onnxruntime cannot load {path}: {first}") from None


def _decoded(meta: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata_props`` of an exported model, JSON values decoded."""
    return OnnxModel(path, threads=1).metadata()


def read_graph(path: str | Path) -> Any | None:
    """An ONNX file's model (``ModelProto``) without its external tensors' data, read with the
    ``onnx`` package; None where onnx cannot parse it (a runtime may still load it)."""
    from dopq.export.onnx_export import require_onnx

    onnx = require_onnx()
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:  # any parser failure: the file is not one onnx reads
        return None


def onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The ``metadata_props`` of an ONNX file read with the ``onnx`` package (no runtime needed)."""
    from dopq.export.onnx_export import require_onnx

    onnx = require_onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a file the runtime loaded but onnx cannot parse is unusable
        raise ExportError(f"cannot read the metadata of {path}: {type(exc).__name__}") from None
    return _decoded({entry.key: entry.value for entry in model.metadata_props})


def external_data_files(model: Any) -> list[str]:
    """The files beside an ONNX graph that hold its external tensors (their ``location`` relative to
    the graph's folder, sorted), for a model read by :func:`read_graph`: part of what a runtime
    reads, so part of the model's identity."""
    from dopq.export.onnx_export import require_onnx

    external = require_onnx().TensorProto.EXTERNAL
    locations: set[str] = set()
    graphs = [model.graph]
    while graphs:  # the main graph and every subgraph (If / Loop bodies)
        graph = graphs.pop()
        tensors = [*graph.initializer, *(s.values for s in graph.sparse_initializer)]
        for node in graph.node:
            for attr in node.attribute:
                tensors += [attr.t, *attr.tensors] if attr.HasField("t") else list(attr.tensors)
                graphs += [attr.g, *attr.graphs] if attr.HasField("g") else list(attr.graphs)
        for tensor in tensors:
            if tensor.data_location == external:
                locations.update(e.value for e in tensor.external_data if e.key == "location")
    return sorted(locations)


def logits_width(model: Any) -> int | None:
    """The fixed last dimension of the first output of a model read by :func:`read_graph` (its class
    count for a classifier); None where it is free or not recorded."""
    outputs = model.graph.output
    dims = outputs[0].type.tensor_type.shape.dim if outputs else ()
    return (dims[-1].dim_value or None) if dims else None


def load_runtime(path: str | Path, runtime: str = "onnxruntime", threads: int | None = None) -> nn.Module:
    """An exported model as ``forward(images) -> logits`` with ``metadata()``, run by onnxruntime
    (:class:`OnnxModel`) or OpenVINO (:class:`~dopq.export.openvino_runtime.OpenVinoModel`).
    Warns where the file's integer products are not exact on this CPU (:func:`inexact_here`)."""
    if runtime == "onnxruntime":
        model: nn.Module = OnnxModel(path, threads=threads)
    elif runtime == "openvino":
        from dopq.export.openvino_runtime import OpenVinoModel

        model = OpenVinoModel(path, threads=threads)
    else:
        raise ExportError(f"unknown runtime {runtime!r}: use one of {', '.join(RUNTIMES)}")
    # the metadata the runtime already read (onnxruntime's session), not a second parse of the file;
    # whatever the file's name (a graph saved as model.bin was run without the warning)
    try:
        metadata = model.metadata()
    except ExportError:  # a model the onnx package cannot parse records nothing to check
        metadata = {}
    if reason := _inexact_reason(path, metadata):
        warnings.warn(reason, stacklevel=2)
    return model


def inexact_here(path: str | Path) -> str | None:
    """Why a dopq export's integer products may differ from the simulation on this CPU, or None.

    8-bit weights stored in int8 (``needs_vnni`` in the file's metadata) meet uint8 activations in
    uint8 x int8 kernels, whose int16 pair sums saturate on x86 CPUs without VNNI (AVX2 only).
    """
    try:
        metadata = onnx_metadata(path)
    except ExportError:  # not a file dopq can read: the runtime says why
        return None
    return _inexact_reason(path, metadata)


def saturating_cpu() -> str | None:
    """This CPU's model name where its uint8 x int8 integer kernels add pairs of products in
    saturating 16 bits (x86 without VNNI: AVX2 only), else None (VNNI / AMX, ARM: exact int32)."""
    from dopq.environment import cpu_info

    if platform.machine().lower() not in _X86:
        return None
    cpu = cpu_info()
    return None if set(cpu["integer_isa"]) & _VNNI else str(cpu["model"])


def _inexact_reason(path: str | Path, metadata: dict[str, Any]) -> str | None:
    if not metadata.get("needs_vnni", False) or (cpu := saturating_cpu()) is None:
        return None
    return (
        f"{path} stores 8-bit weights in int8, whose uint8 x int8 products can saturate on this CPU "
        f"({cpu}, no VNNI): some predictions may differ from the simulation's. Export with "
        "--export-weight-type uint8 (export_onnx(..., weight_type='uint8')) for exact products here"
    )


_X86 = ("x86_64", "amd64", "i686", "i386")
_VNNI = {"avx512_vnni", "avx_vnni", "amx_int8"}


def optimized_graph(path: str | Path, threads: int | None = 1) -> Any:
    """The model onnxruntime actually runs after its optimizations (an ``onnx.ModelProto``)."""
    onnx = __import__("onnx")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "optimized.onnx")
        _session(path, threads, out)
        return onnx.load(out)


def optimized_op_counts(path: str | Path, threads: int | None = 1) -> Counter[str]:
    """Op types (with their counts) of the graph onnxruntime actually runs after its optimizations."""
    return Counter(node.op_type for node in optimized_graph(path, threads).graph.node)


class OnnxModel(nn.Module):
    """An onnxruntime session behind ``forward(images) -> logits`` (CPU provider).

    Args:
        path: the ``.onnx`` file (input ``images``, output ``logits``).
        threads: onnxruntime intra-op threads (None: its default).
        optimize: onnxruntime's graph optimizations (its QDQ fusions into integer kernels); off runs
            the graph as written (float ops on dequantized values), for comparisons.
    """

    def __init__(self, path: str | Path, threads: int | None = None, optimize: bool = True) -> None:
        super().__init__()
        self.path = str(path)
        self.session = _session(path, threads, optimize=optimize)
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = static_dims(self.session.get_inputs()[0].shape)

    def metadata(self) -> dict[str, Any]:
        """The model's ``metadata_props`` (recipe, preprocessing, provenance), JSON values decoded."""
        return _decoded(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_shape, self.path)
        array = images.detach().cpu().float().contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: array})[0])
