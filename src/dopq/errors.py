"""User-facing errors: each carries one actionable line that the CLI prints without a traceback."""

from __future__ import annotations

__all__ = [
    "CalibrationError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DopqError",
    "ExportError",
    "ModelError",
]


class DopqError(Exception):
    """Base class of errors caused by user input (paths, names, options)."""


class ConfigError(DopqError, ValueError):
    """An invalid quantization recipe or option."""


class ModelError(DopqError):
    """Unknown architecture or unsupported model family."""


class CheckpointError(DopqError):
    """Missing, corrupt or mismatched checkpoint or saved quantized model."""


class DataError(DopqError):
    """Missing data path or split, empty split, unreadable image."""


class ExportError(DopqError):
    """A model that cannot be exported (not quantized, unsupported option, missing runtime)."""


class CalibrationError(DopqError):
    """Calibration cannot give valid quantizers (e.g. NaN or Inf reach a quantizer)."""
