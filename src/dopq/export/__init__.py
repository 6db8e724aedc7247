"""Deployment: the integer form of a quantized model, its ONNX (QDQ) export and runs in onnxruntime
or OpenVINO.

Reads the quantized model only through the quantizers' code/table API, so the exported codes are
the simulated ones. ``onnx`` / ``onnxruntime`` / ``openvino`` are imported lazily (clear errors when missing).
"""

from dopq.export.deploy import WEIGHT_TYPES, check_quantized, to_deploy
from dopq.export.onnx_export import DEFAULT_OPSET, MIN_OPSET, ExportReport, export_onnx
from dopq.export.openvino_runtime import OpenVinoModel, openvino_layer_precisions, openvino_layers
from dopq.export.runtime import (
    INTEGER_OPS,
    RUNTIMES,
    OnnxModel,
    external_data_files,
    inexact_here,
    load_runtime,
    optimized_op_counts,
    read_metadata,
)

__all__ = [
    "DEFAULT_OPSET",
    "INTEGER_OPS",
    "MIN_OPSET",
    "RUNTIMES",
    "WEIGHT_TYPES",
    "ExportReport",
    "OnnxModel",
    "OpenVinoModel",
    "check_quantized",
    "export_onnx",
    "external_data_files",
    "inexact_here",
    "load_runtime",
    "openvino_layer_precisions",
    "openvino_layers",
    "optimized_op_counts",
    "read_metadata",
    "to_deploy",
]
