"""Run exported graphs with OpenVINO's CPU plugin, as a torch module the evaluation loop can use.

OpenVINO reads dopq's ONNX (QDQ) files directly. Its low-precision transformations turn each
``QuantizeLinear -> DequantizeLinear`` pair into a ``FakeQuantize`` and run a product on integer
kernels only when the dequantization of its operands has no zero point on the weights (a Linear) or
on either operand (a product of two activations); the export writes that form (docs/export.md,
OpenVINO). :func:`openvino_layer_precisions` lists what the compiled model really runs.

``openvino`` is an optional extra (``pip install 'dopq[openvino]'``), imported lazily.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dopq.errors import ExportError
from dopq.export.runtime import check_images, check_threads, static_dims

__all__ = [
    "OpenVinoModel",
    "compile_config",
    "compile_model",
    "openvino_layer_precisions",
    "openvino_layers",
    "require_openvino",
]

INTEGER_PRECISIONS = frozenset({"u8", "i8"})


def require_openvino() -> Any:
    """The ``openvino`` module, or a clear error when it is not installed."""
    try:
        import openvino
    except ImportError:
        raise ExportError("--runtime openvino needs OpenVINO: pip install 'dopq[openvino]'") from None
    return openvino


def compile_config(threads: int | None) -> dict[str, Any]:
    """OpenVINO CPU compile options for dopq's graphs: f32 float parts even on CPUs with bf16
    (AVX-512 / AMX), where OpenVINO would run them in bf16, and ``threads`` inference threads."""
    check_threads(threads)
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


@functools.cache
def _core(ov: Any) -> Any:
    """One OpenVINO ``Core`` for the process: compiled models outlived the cores that made them and
    the process crashed (SIGSEGV) freeing them once several shapes were compiled per model."""
    return ov.Core()


def compile_model(
    path: str | Path, threads: int | None, shape: tuple[int, ...] | None = None, **options: Any
) -> Any:
    """The compiled model (:func:`compile_config`, plus ``options`` such as ``PERF_COUNT=True``), for
    inputs of ``shape`` only when one is given: OpenVINO fuses more with static shapes (see
    :class:`OpenVinoModel`)."""
    core = _core(require_openvino())
    with _loading(path):
        model = core.read_model(str(path))
        if shape is not None:
            model.reshape(list(shape))
        return core.compile_model(model, "CPU", {**compile_config(threads), **options})


def _input_shape(path: str | Path) -> tuple[int | None, ...]:
    """Read the model (not compile it): a missing or unreadable file fails here, with the error
    :func:`compile_model` gives; returns its input's shape (None: a dynamic dimension)."""
    core = _core(require_openvino())
    with _loading(path):
        shape = core.read_model(str(path)).input(0).get_partial_shape()
        return static_dims(d.get_length() if d.is_static else None for d in shape)


@contextlib.contextmanager
def _loading(path: str | Path) -> Iterator[None]:
    if not Path(path).is_file():
        raise ExportError(f"ONNX model {path} does not exist")
    try:
        yield
    except Exception as exc:  # any reader or compiler failure means the file is unusable here
        raise ExportError(f"OpenVINO cannot load {path}: {_reason(exc)}") from None


# OpenVINO's messages open with the C++ frames they passed ("Exception from src/.../core.cpp:84:",
# "Check '...' failed at src/...cpp:47:"): the first line never said why (an external data file
# outside the graph's folder, a file that is no model)
_FRAME = re.compile(r"(^Exception from |failed at )\S+:\d+:?$")


def _reason(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not _FRAME.search(ln.strip())]
    return " ".join(lines)[:300] if lines else type(exc).__name__


def _rt(op: Any, key: str) -> str:
    info = op.get_rt_info()
    return info[key].astype(str) if key in info else ""


def openvino_layer_precisions(path: str | Path, threads: int | None = 1) -> list[tuple[str, str]]:
    """``(layer type, runtime precision)`` of every layer OpenVINO's CPU plugin runs for a model,
    from its compiled runtime model (``FullyConnected`` / ``MatMul`` on ``u8`` or ``i8`` run on
    integer kernels; ``f32`` on float ones). Constants are left out."""
    return [(kind, precision) for kind, precision, _ in openvino_layers(path, threads)]


def openvino_layers(path: str | Path, threads: int | None = 1) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(layer type, runtime precision, names of the model's ops it runs)`` of every layer of the
    compiled runtime model but constants. A fused layer (a ``Subgraph`` running ``q @ k^T``, Softmax
    and ``attn @ v`` at once, say) names every op it took in, so each op of the file can be traced
    to the kernel that runs it."""
    runtime = compile_model(path, threads).get_runtime_model()
    layers = []
    for op in runtime.get_ordered_ops():
        kind = _rt(op, "layerType")
        if kind != "Const":
            names = tuple(n for n in _rt(op, "originalLayersNames").split(",") if n)
            layers.append((kind, _rt(op, "runtimePrecision"), names))
    return layers


class OpenVinoModel(nn.Module):
    """An OpenVINO compiled model (CPU plugin) behind ``forward(images) -> logits``, with the same
    interface as :class:`dopq.export.OnnxModel`.

    The model is compiled once per input shape (``static_shapes``, the default), as OpenVINO's
    guides advise for CPUs: with the batch dimension left dynamic its CPU plugin fused none of the
    element-wise chains of a quantized graph, the post-Softmax levels of a W4/A4 DeiT-Tiny among
    them (at less than half the speed of the same file compiled for batch 32; docs/export.md).
    Each new shape costs one compilation, at its first batch; construction only reads the file.

    Args:
        path: the ``.onnx`` file (input ``images``, output ``logits``).
        threads: OpenVINO's inference threads (None: its default).
        static_shapes: compile for each input shape seen instead of once with a dynamic batch.
    """

    def __init__(self, path: str | Path, threads: int | None = None, static_shapes: bool = True) -> None:
        super().__init__()
        check_threads(threads)
        self.path, self.threads, self.static_shapes = str(path), threads, static_shapes
        # a bad file fails now; compiling waits for the first input's shape
        self.input_shape = _input_shape(path)
        self._by_shape: dict[tuple[int, ...] | None, tuple[Any, Any]] = {}
        # one infer request per shape: two threads inferring on it at once got each other's logits
        self._lock = threading.Lock()

    def _runner(self, shape: tuple[int, ...]) -> tuple[Any, Any]:
        key = shape if self.static_shapes else None  # None: one model compiled for a dynamic batch
        if key not in self._by_shape:
            compiled = compile_model(self.path, self.threads, key)
            self._by_shape[key] = (compiled, compiled.create_infer_request())
        return self._by_shape[key]

    def metadata(self) -> dict[str, Any]:
        """The model's ``metadata_props`` (recipe, preprocessing, provenance), JSON values decoded."""
        from dopq.export.runtime import onnx_metadata

        return onnx_metadata(self.path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.input_shape, self.path)
        array = images.detach().cpu().float().contiguous().numpy()
        with self._lock:
            compiled, request = self._runner(tuple(array.shape))
            out = request.infer({0: array})[compiled.output(0)]
            return torch.from_numpy(out.copy())
