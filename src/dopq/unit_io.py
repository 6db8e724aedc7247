"""A model's units seen from one forward: the input or output a unit receives from the images
(cached where it fits), each unit as a one-tensor callable, and which units feed the next one
directly. Block reconstruction works over them (:mod:`dopq.reconstruct`).
"""

from __future__ import annotations

import itertools
from contextlib import suppress
from typing import Any

import torch
from torch import nn

from dopq.modules import StopForward, removing_hooks

__all__ = ["BoundUnit", "apply_unit", "bound_units", "cache_unit_io", "chained_units", "first_output"]


def _cache_home(device: torch.device, chunk: torch.Tensor, n_chunks: int) -> torch.device:
    """Where a unit's cache of ``n_chunks`` chunks like ``chunk`` is kept: on a CUDA device when it
    fits in a quarter of the free memory there (each step then indexes it in place), else on the CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    wanted = chunk.numel() * chunk.element_size() * n_chunks
    return device if 4 * wanted < free else torch.device("cpu")


def _keep(chunks: list[torch.Tensor], chunk: torch.Tensor, device: torch.device, n_chunks: int) -> None:
    """Append ``chunk`` to a cache of ``n_chunks``, all where the first one went (``_cache_home``)."""
    home = chunks[0].device if chunks else _cache_home(device, chunk, n_chunks)
    chunks.append(chunk.to(home))


@torch.no_grad()
def cache_unit_io(
    model: nn.Module, unit: nn.Module, images: torch.Tensor, batch_size: int, output: bool
) -> torch.Tensor:
    """Run ``model`` on ``images`` up to ``unit`` and return the unit's input (or output), on the
    model's CUDA device where it fits (``_cache_home``), else on the CPU.

    The forward stops at ``unit``, so later blocks cost nothing.
    """
    device = next(model.parameters()).device
    n_chunks = -(-images.shape[0] // batch_size)
    chunks: list[torch.Tensor] = []

    def take(tensor: torch.Tensor) -> None:
        _keep(chunks, tensor.detach(), device, n_chunks)
        raise StopForward

    if output:
        handle = unit.register_forward_hook(lambda m, a, out: take(first_output(out)))
    else:
        handle = unit.register_forward_pre_hook(lambda m, a: take(a[0]))
    with handle:  # removes the hook on leaving
        for i in range(0, images.shape[0], batch_size):
            with suppress(StopForward):
                model(images[i : i + batch_size].to(device))
    return torch.cat(chunks)


def first_output(output: Any) -> torch.Tensor:
    """A unit's output tensor: the first element where it returns a tuple (a ``transformers`` layer
    returns its hidden states and attention weights)."""
    return output[0] if isinstance(output, tuple) else output


class BoundUnit(nn.Module):
    """A unit called with one tensor: the other arguments the model passes it (a ``transformers``
    Swin layer's input resolution and shift mask, a BEiT layer's resolution), recorded from one
    forward, are passed again, and a tuple output gives its first element. The arguments must not
    depend on the batch (true of every adapter's units: masks and sizes are per window / image size).
    """

    def __init__(self, unit: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.unit, self.args, self.kwargs = unit, args, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_output(self.unit(x, *self.args, **self.kwargs))


@torch.no_grad()
def bound_units(
    model: nn.Module, units: list[tuple[str, nn.Module]], sample: torch.Tensor
) -> dict[str, nn.Module]:
    """Each unit as a one-tensor callable: the unit itself where the model calls it with its input
    alone and gets a tensor back (every timm unit), else a :class:`BoundUnit`."""
    calls: dict[str, tuple[tuple[Any, ...], dict[str, Any], bool]] = {}
    handles = []
    for name, unit in units:

        def record(m: nn.Module, args: tuple, kwargs: dict, out: Any, n: str = name) -> None:
            calls.setdefault(n, (args[1:], kwargs, isinstance(out, tuple)))

        handles.append(unit.register_forward_hook(record, with_kwargs=True))
    with removing_hooks(handles):
        model(sample)
    bound = {}
    for name, unit in units:
        args, kwargs, is_tuple = calls.get(name, ((), {}, False))
        bound[name] = BoundUnit(unit, args, kwargs) if args or kwargs or is_tuple else unit
    return bound


@torch.no_grad()
def chained_units(model: nn.Module, units: list[tuple[str, nn.Module]], sample: torch.Tensor) -> list[bool]:
    """For each unit, whether its input is the previous unit's output tensor itself.

    Found from one forward of ``sample``, not from names: where it holds, a unit's cached input
    is the previous unit applied to that unit's cached input, so no forward from the image is needed.
    """
    seen_in: dict[str, torch.Tensor] = {}
    seen_out: dict[str, torch.Tensor] = {}
    handles = []
    for name, unit in units:
        # the hooks return None: a returned value would replace the unit's arguments or output
        def keep_input(m: nn.Module, a: tuple, n: str = name) -> None:
            seen_in.setdefault(n, a[0])

        def keep_output(m: nn.Module, a: tuple, out: Any, n: str = name) -> None:
            seen_out.setdefault(n, first_output(out))

        handles.append(unit.register_forward_pre_hook(keep_input))
        handles.append(unit.register_forward_hook(keep_output))
    with removing_hooks(handles):
        model(sample)
    names = [name for name, _ in units]
    links = [
        name in seen_in and seen_in[name] is seen_out.get(prev) for prev, name in itertools.pairwise(names)
    ]
    return [False, *links]


@torch.no_grad()
def apply_unit(unit: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``unit`` over cached ``inputs`` in batches; the result is cached where ``_cache_home`` says."""
    device = next(unit.parameters()).device
    n_chunks = -(-inputs.shape[0] // batch_size)
    chunks: list[torch.Tensor] = []
    for i in range(0, inputs.shape[0], batch_size):
        _keep(chunks, unit(inputs[i : i + batch_size].to(device)), device, n_chunks)
    return torch.cat(chunks)
