"""Where a run computes: the device names dopq takes (``cpu``, ``cuda[:i]``), checked once."""

from __future__ import annotations

import torch

from dopq.errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """``cpu`` or ``cuda[:i]``, refusing CUDA when none is available."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available here; use --device cpu")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ConfigError(f"--device must be cpu or cuda[:N], got {name!r}")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device must be cpu or cuda[:N], got {name!r}") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
