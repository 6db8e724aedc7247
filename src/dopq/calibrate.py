"""Calibration: an observer phase in which each quantizer initialises from its first input.

One forward pass over the whole calibration batch with every quantizer on, as RepQ-ViT does:
quantizers initialise lazily in forward order, so each one sees inputs that upstream quantizers
already perturbed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from dopq.modules import quantizers_of

__all__ = ["calibrate", "capture_inputs", "observing"]


@contextmanager
def observing(model: nn.Module) -> Iterator[nn.Module]:
    """Let uncalibrated quantizers initialise from the tensors they see inside the block."""
    quantizers = [q for _, q in quantizers_of(model)]
    for q in quantizers:
        q.observing = True
    try:
        yield model
    finally:
        for q in quantizers:
            q.observing = False


@contextmanager
def capture_inputs(
    model: nn.Module, names: Iterable[str], max_rows: int = 4096, seed: int = 0
) -> Iterator[dict[str, torch.Tensor]]:
    """Record a fixed random subset of input rows (tokens) of the named Linear layers.

    The rows are taken before the layer's input quantizer, as ``(rows, in_features)``.
    """
    captured: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if name in captured:
                return
            rows = args[0].detach().reshape(-1, args[0].shape[-1])
            idx = torch.randperm(rows.shape[0], generator=gen)[:max_rows].to(rows.device)
            captured[name] = rows[idx].clone()

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def calibrate(model: nn.Module, images: torch.Tensor) -> None:
    """Reset every quantizer and initialise all of them from one pass over ``images``.

    Args:
        model: a prepared (quantizer-equipped) model.
        images: the calibration batch ``(N, 3, H, W)`` on the model's device.
    """
    for _, q in quantizers_of(model):
        q.reset()
    model.eval()
    with observing(model):
        model(images)
    missing = [name for name, q in quantizers_of(model) if q.enabled and not bool(q.initialized)]
    if missing:
        raise RuntimeError(f"calibration did not reach {len(missing)} quantizers, e.g. {missing[:3]}")
