"""Find which Linear layers read a LayerNorm's output, from the autograd graph of one forward pass.

A Linear whose input is a LayerNorm output, possibly after token rearrangements that keep the
channel (last) axis (views, permutes, transposes, Swin's roll and window partition), is a
re-parameterization candidate. Layer roles come from module types and data flow, never from names.
Not pairs:

* a pooled or token-selected input (the classifier head);
* a LayerNorm of one vector per image (``fc_norm`` after average pooling, BEiT's pooler): its
  per-channel ranges would rest on one value per calibration image, and the test values they clip
  cost about ten times the error of one per-tensor range at W8/A8 (a tiny random ViT and BEiT, 32
  calibration images);
* a padded LayerNorm output: a padded token is 0 before the fold and would have to stay what 0 was
  after it, which a per-channel fold cannot give (Swin pads to whole windows where the token grid is
  not a multiple of the window); only a pad of nothing passes (timm's Swin calls ``F.pad`` with
  zeros where the grid fits);
* a LayerNorm whose output is also read by anything else (a post-norm residual, as in Swin-V2's
  patch merging): folding into it would change the float function.

Their Linear layers keep a per-tensor input quantizer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from dopq.modules import removing_hooks

__all__ = ["LayerNormPair", "find_layernorm_pairs"]

# Autograd nodes that only move tokens around and keep channels on the last axis.
_TOKEN_REARRANGEMENTS = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "CloneBackward0",
        "PermuteBackward0",
        "TransposeBackward0",  # transformers' Swin window partition: transpose(2, 3) of a 6-d view
        "RollBackward0",
    }
)


@dataclass
class LayerNormPair:
    """A LayerNorm and the Linear layers that consume its output (by qualified name)."""

    norm: str
    linears: list[str] = field(default_factory=list)


def _pads_nothing(node: object) -> bool:
    """True for a constant pad of zero amounts on every axis (a crop is refused too: autograd keeps
    negative amounts as unsigned integers)."""
    pad = getattr(node, "_saved_pad", None)
    return pad is not None and all(p == 0 for p in pad)


def _is_rearrangement(node: object) -> bool:
    name = node.name()
    return name in _TOKEN_REARRANGEMENTS or (name == "ConstantPadNdBackward0" and _pads_nothing(node))


def _chain(node: object | None) -> list[object]:
    """``node`` and the token rearrangements above it, up to the first other node (inclusive)."""
    chain = [node]
    while node is not None and _is_rearrangement(node) and node.next_functions:
        node = node.next_functions[0][0]
        chain.append(node)
    return chain


def _consumers(output: torch.Tensor) -> dict[object, int]:
    """How many autograd nodes read each node's output, over the whole graph behind ``output``."""
    count: dict[object, int] = {}
    seen, todo = set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for parent, _ in node.next_functions:
            if parent is not None:
                count[parent] = count.get(parent, 0) + 1
                todo.append(parent)
    return count


def _exclusive(chains: list[list[object]], consumers: dict[object, int]) -> bool:
    """True when the LayerNorm output is read only along ``chains`` (token rearrangements ending in
    the Linear inputs): each node has exactly the readers those chains and Linear calls account for.
    A post-norm residual, or anything else reading it, makes a fold change the float function."""
    readers: dict[object, set[object]] = {}
    linear_reads: dict[object, int] = {}
    for chain in chains:
        linear_reads[chain[0]] = linear_reads.get(chain[0], 0) + 1
        for child, parent in itertools.pairwise(chain):
            readers.setdefault(parent, set()).add(child)
    nodes = {n for chain in chains for n in chain}
    expected = {n: len(readers.get(n, ())) + linear_reads.get(n, 0) for n in nodes}
    return all(consumers.get(n, 0) == expected[n] for n in nodes)


def _no_saved_tensors() -> torch.autograd.graph.saved_tensors_hooks:
    """Autograd keeps nothing for a backward pass (which then cannot run)."""
    return torch.autograd.graph.saved_tensors_hooks(lambda _: None, lambda _: None)


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
    chains: dict[str, list[list[object]]] = {}
    handles = []

    def on_norm(name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if output.grad_fn is not None and output.dim() > 2:  # a row per token, not one per image
                norm_of_node[output.grad_fn] = name

        return hook

    def on_linear(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            chain = _chain(args[0].grad_fn)
            norm = norm_of_node.get(chain[-1])
            if norm is not None:
                pairs.setdefault(norm, LayerNormPair(norm)).linears.append(name)
                chains.setdefault(norm, []).append(chain)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            handles.append(module.register_forward_hook(on_norm(name)))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(on_linear(name)))
    # only the graph's structure is read, never a backward run: the tensors autograd saves for one
    # are dropped as they come (they had held every block's activations, attention maps included:
    # about 7 GB for one 518-pixel image through a DINOv2-L)
    with removing_hooks(handles), torch.enable_grad(), _no_saved_tensors():
        output = model(example.detach().clone().requires_grad_(True))
    consumers = _consumers(output)
    return [pair for norm, pair in pairs.items() if _exclusive(chains[norm], consumers)]
