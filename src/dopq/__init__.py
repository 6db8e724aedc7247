"""dopq: post-training quantization of Vision Transformers (DopQ-ViT and the RepQ-ViT baseline)."""

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
