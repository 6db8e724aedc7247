"""dopq: post-training quantization of Vision Transformers (DopQ-ViT and the RepQ-ViT baseline)."""

import importlib
from types import ModuleType

from dopq.api import QuantizationReport, quantize, quantize_with_report
from dopq.config import QuantConfig, ReconstructConfig, get_preset, list_presets
from dopq.errors import DopqError

__version__ = "0.1.0"

__all__ = [
    "DopqError",
    "QuantConfig",
    "QuantizationReport",
    "ReconstructConfig",
    "__version__",
    "get_preset",
    "list_presets",
    "quantize",
    "quantize_with_report",
]

# subpackages the top-level import does not load (the export pulls in onnx, the plots matplotlib),
# reachable as attributes all the same: `import dopq; dopq.export.export_onnx(...)`
_LAZY = frozenset({"data", "environment", "evaluate", "experiment", "export", "plots", "report"})


def __getattr__(name: str) -> ModuleType:
    if name in _LAZY:
        return importlib.import_module(f"dopq.{name}")
    raise AttributeError(f"module 'dopq' has no attribute {name!r}")
