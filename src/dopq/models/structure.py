"""Find which Linear layers read a LayerNorm's output, from the autograd graph of one forward pass.

A Linear whose input is a LayerNorm output, possibly after token rearrangements that keep the
channel (last) axis (views, permutes, Swin's roll/pad/window partition), is a re-parameterization
candidate. Layer roles come from module types and data flow, never from names: a pooled or
token-selected input (the classifier head) is not a pair.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["LayerNormPair", "find_layernorm_pairs"]

# Autograd nodes that only move tokens around and keep channels on the last axis.
_TOKEN_REARRANGEMENTS = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "CloneBackward0",
        "PermuteBackward0",
        "ConstantPadNdBackward0",
        "RollBackward0",
    }
)


@dataclass
class LayerNormPair:
    """A LayerNorm and the Linear layers that consume its output (by qualified name)."""

    norm: str
    linears: list[str] = field(default_factory=list)


def _source_node(node: object | None) -> object | None:
    while node is not None and node.name() in _TOKEN_REARRANGEMENTS:
        node = node.next_functions[0][0] if node.next_functions else None
    return node


def find_layernorm_pairs(model: nn.Module, example: torch.Tensor) -> list[LayerNormPair]:
    """Trace one forward pass and return every LayerNorm -> Linear pairing, in forward order.

    Args:
        model: a float model (any architecture).
        example: an input batch, e.g. ``torch.zeros(1, 3, 224, 224)``.

    Returns:
        Pairs in the order the LayerNorms run.
    """
    norm_of_node: dict[object, str] = {}
    pairs: dict[str, LayerNormPair] = {}
    handles = []

    def on_norm(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if output.grad_fn is not None:
                norm_of_node[output.grad_fn] = name

        return hook

    def on_linear(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            norm = norm_of_node.get(_source_node(args[0].grad_fn))
            if norm is not None:
                pairs.setdefault(norm, LayerNormPair(norm)).linears.append(name)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            handles.append(module.register_forward_hook(on_norm(name)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(on_linear(name)))
    try:
        with torch.enable_grad():
            model(example.detach().clone().requires_grad_(True))
    finally:
        for h in handles:
            h.remove()
    return list(pairs.values())
