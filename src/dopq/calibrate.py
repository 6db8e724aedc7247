"""Calibration: an observer phase in which each quantizer initialises from its first input.

One forward pass over the whole calibration batch with every quantizer on, as RepQ-ViT does:
quantizers initialise lazily in forward order, so each one sees inputs that upstream quantizers
already perturbed. After re-parameterization, :func:`correct_bias` removes the mean output error
of every quantized Linear (empirical bias correction).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dopq.errors import CalibrationError
from dopq.modules import QuantLinear, quantizers_of, quantizers_set, removing_hooks, weight_quantizer_ids

__all__ = ["BIAS_CORRECTION_IMAGES", "calibrate", "capture_inputs", "correct_bias", "observing"]

# 8 images = 1576 DeiT tokens per mean: enough for the mean error, a quarter of a calibration pass
BIAS_CORRECTION_IMAGES = 8


def observing(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Let uncalibrated quantizers initialise from the tensors they see inside the block."""
    return quantizers_set(model, observing=True)


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

    with removing_hooks([model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]):
        yield captured


def _finite_check(name: str, is_weight: bool):
    """A pre-hook refusing NaN/Inf before a quantizer initialises from them: its range search would
    keep no candidate and leave the initial scale 1 and zero point 0, a broken quantizer."""

    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        if module.enabled and not module.is_ready() and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            what = "weights" if is_weight else "calibration activations"
            raise CalibrationError(
                f"{name} sees {bad} NaN/Inf values in its {what}: the float model already computes "
                "non-finite values here; check the checkpoint and the input images"
            )

    return hook


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
    weight_ids = weight_quantizer_ids(model)
    handles = [
        q.register_forward_pre_hook(_finite_check(name, id(q) in weight_ids))
        for name, q in quantizers_of(model)
    ]
    with removing_hooks(handles), observing(model):
        model(images)
    missing = [name for name, q in quantizers_of(model) if q.enabled and not q.is_ready()]
    if missing:
        raise RuntimeError(f"calibration did not reach {len(missing)} quantizers, e.g. {missing[:3]}")


@torch.no_grad()
def correct_bias(
    model: nn.Module,
    images: torch.Tensor,
    max_images: int = BIAS_CORRECTION_IMAGES,
    reference_weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Empirical bias correction (Nagel et al., 2019) of every quantized Linear, in forward order.

    Quantization errors do not average out: ``Q(W) Q(x) - W x`` has a non-zero mean per output
    channel, which shifts every later activation. In one pass over the first ``max_images`` of
    ``images`` each Linear measures that mean on its inputs in the quantized model, subtracts it
    from its bias and passes the corrected output on, so later layers are corrected for what they
    will really see. ``reference_weights`` gives the float weights of layers whose ``weight``
    already holds its quantized value (GPTQ), by layer name: the error is measured against them.
    Returns the largest correction per layer.
    """
    reference = reference_weights or {}
    corrections: dict[str, float] = {}

    def hook_for(name: str):
        def hook(module: QuantLinear, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if name in corrections:  # a module called twice in one forward is corrected once
                return None
            x = args[0] if module.input_offset is None else args[0] + module.input_offset
            weight = reference.get(name, module.weight)
            mean_err = (out - F.linear(x, weight, module.bias)).reshape(-1, out.shape[-1]).mean(0)
            if module.bias is None:
                module.bias = nn.Parameter(-mean_err)
            else:
                module.bias.sub_(mean_err)
            corrections[name] = float(mean_err.abs().max())
            return out - mean_err

        return hook

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    with removing_hooks([m.register_forward_hook(hook_for(n)) for n, m in layers]):
        model.eval()
        model(images[:max_images])
    return corrections
