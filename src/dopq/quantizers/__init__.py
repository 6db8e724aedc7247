"""Quantizers: pure tensor math plus thin modules holding their parameters. No model knowledge."""

from dopq.quantizers.auto import AUTO_CANDIDATES, AutoLevelQuantizer
from dopq.quantizers.base import (
    Consumer,
    DropNoise,
    PerChannel,
    PerTensor,
    Quantizer,
    build_quantizer,
    list_quantizers,
    quantizer_name,
    register_quantizer,
)
from dopq.quantizers.levels import LevelQuantizer, Log2Quantizer, LogQuantizer, LogSqrt2Quantizer
from dopq.quantizers.tanq import TanQQuantizer, tan_levels
from dopq.quantizers.uniform import (
    UniformQuantizer,
    fake_quantize_uniform,
    quantize_uniform,
    search_output_range,
    search_symmetric_range,
    search_uniform_range,
)

__all__ = [
    "AUTO_CANDIDATES",
    "AutoLevelQuantizer",
    "Consumer",
    "DropNoise",
    "LevelQuantizer",
    "Log2Quantizer",
    "LogQuantizer",
    "LogSqrt2Quantizer",
    "PerChannel",
    "PerTensor",
    "Quantizer",
    "TanQQuantizer",
    "UniformQuantizer",
    "build_quantizer",
    "fake_quantize_uniform",
    "list_quantizers",
    "quantize_uniform",
    "quantizer_name",
    "register_quantizer",
    "search_output_range",
    "search_symmetric_range",
    "search_uniform_range",
    "tan_levels",
]
