"""Save a quantized model and load it back for evaluation without redoing the work.

The file (``torch.save`` of plain types only, loaded with ``weights_only=True``) holds the timm
architecture name, the class count, the recipe, the preprocessing, every parameter and quantizer
buffer, and each uniform quantizer's granularity. Loading rebuilds the architecture with timm,
inserts quantizers with the same recipe and loads the state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from dopq.config import QuantConfig
from dopq.errors import CheckpointError
from dopq.models import prepare_model
from dopq.modules import QuantLinear, quantizers_of
from dopq.quantizers import PerChannel, PerTensor, UniformQuantizer

__all__ = ["FORMAT", "SCHEMA_VERSION", "load_quantized", "save_quantized"]

FORMAT = "dopq-quantized"
SCHEMA_VERSION = 1


def _arch_of(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        raise CheckpointError("cannot save: the model has no timm architecture name (pretrained_cfg)")
    return arch


def _granularities(model: nn.Module) -> dict[str, int | None]:
    return {name: q.channel_axis for name, q in quantizers_of(model) if isinstance(q, UniformQuantizer)}


def save_quantized(
    model: nn.Module,
    path: str | Path,
    config: QuantConfig,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a quantized model to ``path``.

    Args:
        model: a model returned by :func:`dopq.quantize`.
        path: output file (``.pt``).
        config: the recipe it was quantized with.
        metadata: extra JSON-like information (e.g. preprocessing, the command line).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "schema": SCHEMA_VERSION,
        "arch": _arch_of(model),
        "num_classes": int(model.num_classes),
        "config": config.to_dict(),
        "granularity": _granularities(model),
        "metadata": metadata or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(payload, path)
    return path


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"quantized model {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable dopq file ({type(exc).__name__})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dopq quantized model (made by `dopq quantize --save`)")
    if payload.get("schema") != SCHEMA_VERSION:
        raise CheckpointError(f"{path} has schema {payload.get('schema')}, this dopq reads {SCHEMA_VERSION}")
    return payload


def _match_state(model: nn.Module, payload: dict[str, Any]) -> None:
    """Give quantizer buffers the saved shapes and granularities, and add folded biases."""
    for name, q in quantizers_of(model):
        if isinstance(q, UniformQuantizer) and name in payload["granularity"]:
            axis = payload["granularity"][name]
            q.granularity = PerTensor() if axis is None else PerChannel(axis)
    state = payload["state_dict"]
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear) and module.bias is None and f"{prefix}bias" in state:
            module.bias = nn.Parameter(torch.zeros(module.out_features))
        if isinstance(module, QuantLinear) and f"{prefix}input_offset" in state:
            module.input_offset = torch.empty_like(state[f"{prefix}input_offset"])
        for key, buf in list(module.named_buffers(recurse=False)):
            saved = state.get(prefix + key)
            if saved is not None and saved.shape != buf.shape:
                setattr(module, key, torch.empty_like(saved))


def load_quantized(
    path: str | Path, arch: str | None = None, device: str | torch.device = "cpu"
) -> tuple[nn.Module, QuantConfig, dict[str, Any]]:
    """Rebuild a model saved by :func:`save_quantized`.

    Args:
        path: the saved file.
        arch: when given, the architecture the caller expects; a file for another one is refused.
        device: where to put the model.

    Returns:
        ``(model, config, metadata)``.
    """
    path = Path(path)
    payload = _read(path)
    if arch is not None and arch != payload["arch"]:
        raise CheckpointError(f"{path} was made for {payload['arch']}, not {arch}")
    config = QuantConfig.from_dict(payload["config"])
    model = timm.create_model(payload["arch"], pretrained=False, num_classes=payload["num_classes"])
    prepare_model(model.eval(), config)
    _match_state(model, payload)
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"{path} does not match {payload['arch']}: {first}") from None
    return model.to(device).eval(), config, payload["metadata"]
