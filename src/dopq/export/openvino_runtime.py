"""Run exported graphs with OpenVINO's CPU plugin, as a torch module the evaluation loop can use.

OpenVINO reads dopq's ONNX (QDQ) files directly. Its low-precision transformations turn each
``QuantizeLinear -> DequantizeLinear`` pair into a ``FakeQuantize`` and run a product on integer
kernels only when the dequantization of its operands has no zero point on the weights (a Linear) or
on either operand (a product of two activations); the export writes that form (docs/export.md,
OpenVINO). :func:`openvino_layer_precisions` lists what the compiled model really runs.

``openvino`` is an optional extra (``pip install 'dopq[openvino]'``), imported lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dopq.errors import ExportError

__all__ = ["OpenVinoModel", "openvino_layer_precisions", "require_openvino"]

INTEGER_PRECISIONS = frozenset({"u8", "i8"})


def require_openvino() -> Any:
    """The ``openvino`` module, or a clear error when it is not installed."""
    try:
        import openvino
    except ImportError:
        raise ExportError("--runtime openvino needs OpenVINO: pip install 'dopq[openvino]'") from None
    return openvino


def _config(threads: int | None) -> dict[str, Any]:
    # f32 even on CPUs with bf16 (AVX-512 / AMX), where OpenVINO would run the float parts in bf16
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return config


def _compile(path: str | Path, threads: int | None) -> Any:
    ov = require_openvino()
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"ONNX model {path} does not exist")
    try:
        return ov.Core().compile_model(str(path), "CPU", _config(threads))
    except Exception as exc:  # any reader or compiler failure means the file is unusable here
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"OpenVINO cannot load {path}: {first}") from None


def _rt(op: Any, key: str) -> str:
    info = op.get_rt_info()
    return info[key].astype(str) if key in info else ""


def openvino_layer_precisions(path: str | Path, threads: int | None = 1) -> list[tuple[str, str]]:
    """``(layer type, runtime precision)`` of every layer OpenVINO's CPU plugin runs for a model,
    from its compiled runtime model (``FullyConnected`` / ``MatMul`` on ``u8`` or ``i8`` run on
    integer kernels; ``f32`` on float ones). Constants are left out."""
    runtime = _compile(path, threads).get_runtime_model()
    layers = [(_rt(op, "layerType"), _rt(op, "runtimePrecision")) for op in runtime.get_ordered_ops()]
    return [(kind, precision) for kind, precision in layers if kind != "Const"]


class OpenVinoModel(nn.Module):
    """An OpenVINO compiled model (CPU plugin) behind ``forward(images) -> logits``, with the same
    interface as :class:`dopq.export.OnnxModel`.

    Args:
        path: the ``.onnx`` file (input ``images``, output ``logits``).
        threads: OpenVINO's inference threads (None: its default).
    """

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        self.path = str(path)
        self.compiled = _compile(path, threads)
        self.request = self.compiled.create_infer_request()

    def metadata(self) -> dict[str, Any]:
        """The model's ``metadata_props`` (recipe, preprocessing, provenance), JSON values decoded."""
        from dopq.export.runtime import onnx_metadata

        return onnx_metadata(self.path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        array = images.detach().cpu().float().contiguous().numpy()
        out = self.request.infer({0: array})[self.compiled.output(0)]
        return torch.from_numpy(out.copy())
