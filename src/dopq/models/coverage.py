"""What a prepared model quantizes and what stays float, found from module types and one forward pass.

Linear and Conv2d layers are counted by type. Attention is found from the forward pass: every call
of a softmax or of ``scaled_dot_product_attention`` (seen through a ``TorchFunctionMode``, torch's
public hook for function calls) is attributed to the innermost running module; a call outside a
quantized attention module is an attention computation that stays float, e.g. an attention class
the family's adapter does not know.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from dopq.models.adapters import quantized_attention_classes
from dopq.modules import QuantConv2d, QuantLinear, quantizers_off, removing_hooks
from dopq.quantizers import LevelQuantizer, Quantizer, quantizer_name

__all__ = ["Coverage", "measure_coverage", "softmax_kinds", "softmax_off_grid"]

_ATTENTION_FUNCTIONS = {torch.softmax, torch.Tensor.softmax, F.softmax, F.scaled_dot_product_attention}


@dataclass
class Coverage:
    """Quantized and total counts per kind, the modules that stay float (``"name (Class)"``) and,
    once calibrated, the post-Softmax quantizer of every ``attn @ v`` (``{module: kind}``)."""

    quantized: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    left_float: dict[str, list[str]] = field(default_factory=dict)
    softmax_kinds: dict[str, str] = field(default_factory=dict)
    # attention modules whose TanQ thresholds could not take the recipe's softmax_grid_bits
    softmax_off_grid: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every Linear, Conv2d and attention computation is quantized."""
        return not any(self.left_float.values())

    def summary(self) -> str:
        """One line, e.g. ``Linear 49/49, Conv2d 1/1, attention 12/12, LayerNorm re-parameterized 24/25``,
        then the post-Softmax kinds once known, e.g. ``; post-Softmax tanq 8, log2 4``."""
        line = ", ".join(f"{kind} {self.quantized[kind]}/{self.total[kind]}" for kind in self.total)
        if self.softmax_kinds:
            kinds = list(self.softmax_kinds.values())
            counts = ", ".join(f"{k} {kinds.count(k)}" for k in dict.fromkeys(kinds))
            line += f"; post-Softmax {counts}"
        if self.softmax_off_grid:
            line += f" ({len(self.softmax_off_grid)} off the threshold grid: exact midpoints)"
        return line

    def to_dict(self) -> dict[str, object]:
        return {
            "quantized": dict(self.quantized),
            "total": dict(self.total),
            "left_float": dict(self.left_float),
            "softmax_kinds": dict(self.softmax_kinds),
            "softmax_off_grid": list(self.softmax_off_grid),
        }


class _AttentionCalls(TorchFunctionMode):
    """Records the innermost running module of every softmax / SDPA call."""

    def __init__(self, stack: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.stack = stack
        self.calls: list[list[tuple[str, nn.Module]]] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func in _ATTENTION_FUNCTIONS:
            self.calls.append(list(self.stack))
        return func(*args, **(kwargs or {}))


def _attention_sites(model: nn.Module, example: torch.Tensor) -> tuple[int, list[str]]:
    """Quantized attention modules that ran, and the float modules that computed attention."""
    stack: list[tuple[str, nn.Module]] = []

    def enter(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            stack.append((name, module))

        return hook

    def leave(module: nn.Module, args: tuple, output: object) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    mode = _AttentionCalls(stack)
    # the probe needs no calibrated parameters
    with removing_hooks(handles), torch.no_grad(), quantizers_off(model), mode:
        model(example)
    quantized, left = set(), {}
    known = quantized_attention_classes()
    for frames in mode.calls:
        owner = next((n for n, m in reversed(frames) if isinstance(m, known)), None)
        if owner is not None:
            quantized.add(owner)
        elif frames:
            name, module = frames[-1]
            left[name] = f"{name} ({type(module).__name__})"
    return len(quantized), list(left.values())


def _layer_counts(
    model: nn.Module, base: type[nn.Module], quant: type[nn.Module]
) -> tuple[int, int, list[str]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, base)]
    left = [f"{n} ({type(m).__name__})" for n, m in layers if not isinstance(m, quant)]
    return len(layers) - len(left), len(layers), left


def measure_coverage(model: nn.Module, example: torch.Tensor, paired_norms: int) -> Coverage:
    """Coverage of a model after ``prepare_model`` (quantizers inserted, calibrated or not).

    Args:
        model: the prepared model.
        example: an input batch for one probe forward pass.
        paired_norms: LayerNorms whose output feeds only Linear layers (re-parameterized).
    """
    cov = Coverage()
    for kind, base, quant in (("Linear", nn.Linear, QuantLinear), ("Conv2d", nn.Conv2d, QuantConv2d)):
        done, total, left = _layer_counts(model, base, quant)
        if total:
            cov.quantized[kind], cov.total[kind], cov.left_float[kind] = done, total, left
    done, left = _attention_sites(model, example)
    cov.quantized["attention"], cov.total["attention"], cov.left_float["attention"] = (
        done,
        done + len(left),
        left,
    )
    norms = sum(isinstance(m, nn.LayerNorm) and m.elementwise_affine for m in model.modules())
    # a LayerNorm that feeds something else (the final norm before pooling) stays as it is: not a gap
    cov.quantized["LayerNorm re-parameterized"], cov.total["LayerNorm re-parameterized"] = paired_norms, norms
    return cov


def softmax_kinds(model: nn.Module) -> dict[str, str]:
    """The post-Softmax quantizer family of every quantized attention module, by module name.

    The quantizer is the left operand's of the module's ``matmul_av``; a per-module choice
    (``auto``) reports the family it chose.
    """
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, quantized_attention_classes()):
            q = module.matmul_av.quantizer_a
            if isinstance(q, Quantizer):
                kinds[name] = quantizer_name(q.resolve() if isinstance(q, LevelQuantizer) else q)
    return kinds


def softmax_off_grid(model: nn.Module) -> list[str]:
    """The quantized attention modules whose post-Softmax TanQ (chosen by ``auto`` too) was asked
    for a threshold grid too coarse for its levels, and so keeps the exact midpoints."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, quantized_attention_classes()):
            q = module.matmul_av.quantizer_a
            q = q.resolve() if isinstance(q, LevelQuantizer) else q
            if callable(getattr(q, "off_grid", None)) and q.off_grid():
                names.append(name)
    return names
