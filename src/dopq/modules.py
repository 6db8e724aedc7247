"""Quantized layers: torch layers with named quantizer slots and a fixed forward pipeline.

``QuantLinear``/``QuantConv2d`` subclass the torch layers, so ``weight``/``bias`` keys (and float
checkpoints) are unchanged. Pipeline: quantize input, quantize weight, run the op.
``QuantMatMul`` quantizes both operands of an activation-activation product.

``QuantLinear`` may carry an ``input_offset`` (set by the post-LayerNorm re-parameterization):
a per-input-channel shift added after the input quantizer, so the quantized weights multiply it.
An integer kernel runs it as per-channel zero points (see docs/mosf.md).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from dopq.config import FLOAT_DTYPES
from dopq.errors import ConfigError
from dopq.quantizers import Consumer, Quantizer, UniformQuantizer

__all__ = [
    "Float64Model",
    "QuantConv2d",
    "QuantLinear",
    "QuantMatMul",
    "StopForward",
    "constant_quantization",
    "float64_copy",
    "float_logits",
    "in_dtype",
    "quantized_weight",
    "quantizers_of",
    "quantizers_off",
    "quantizers_set",
    "removing_hooks",
    "replace_module",
    "set_quantization",
    "weight_quantizer_ids",
]


def _identity_or(q: Quantizer | None) -> nn.Module:
    return q if q is not None else nn.Identity()


class _WeightQuantMixin:
    weight: torch.Tensor
    weight_quantizer: Quantizer | nn.Identity
    input_quantizer: Quantizer | nn.Identity

    def quantized_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)


class QuantLinear(nn.Linear, _WeightQuantMixin):
    """``nn.Linear`` whose input and weight pass through quantizers.

    Args:
        linear: the float layer to wrap (weights are shared, not copied).
        input_quantizer: activation quantizer or None.
        weight_quantizer: weight quantizer (normally per output channel) or None.
    """

    def __init__(
        self, linear: nn.Linear, input_quantizer: Quantizer | None, weight_quantizer: Quantizer | None
    ) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.input_quantizer = _identity_or(input_quantizer)
        self.weight_quantizer = _identity_or(weight_quantizer)
        self.register_buffer("input_offset", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.input_quantizer, Quantizer):  # the product it enters: for its range search
            x = self.input_quantizer(x, self.weight.T)
        else:
            x = self.input_quantizer(x)
        if self.input_offset is not None:
            x = x + self.input_offset
        return F.linear(x, self.quantized_weight(), self.bias)


class QuantConv2d(nn.Conv2d, _WeightQuantMixin):
    """``nn.Conv2d`` whose input and weight pass through quantizers (patch embedding)."""

    def __init__(
        self, conv: nn.Conv2d, input_quantizer: Quantizer | None, weight_quantizer: Quantizer | None
    ) -> None:
        nn.Module.__init__(self)
        for attr in (
            "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
            "transposed", "output_padding", "groups", "padding_mode",
        ):  # fmt: skip
            setattr(self, attr, getattr(conv, attr))
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.weight = conv.weight
        self.bias = conv.bias
        self.input_quantizer = _identity_or(input_quantizer)
        self.weight_quantizer = _identity_or(weight_quantizer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.input_quantizer(x), self.quantized_weight(), self.bias)


class QuantMatMul(nn.Module):
    """``a @ b`` with both operands quantized. Each quantizer sees the product as context (``a``'s
    the quantized ``b``, ``b``'s the float ``a``): TanQ and the uniform output objective score their
    candidates by the error of the product."""

    def __init__(self, quantizer_a: Quantizer | None, quantizer_b: Quantizer | None) -> None:
        super().__init__()
        self.quantizer_a = _identity_or(quantizer_a)
        self.quantizer_b = _identity_or(quantizer_b)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if isinstance(self.quantizer_b, Quantizer):
            b = self.quantizer_b(b, Consumer(left=a))
        if isinstance(self.quantizer_a, Quantizer):
            a = self.quantizer_a(a, b)
        return a @ b


# the hooks a caller may have on a module that dopq replaces: with ``keep_hooks`` the replacement takes
# the same dicts, so the hooks keep running and their handles still remove them (as torch.ao's
# swap_module keeps them)
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def replace_module(root: nn.Module, qualified: str, new: nn.Module, keep_hooks: bool = False) -> nn.Module:
    """Put ``new`` where ``root``'s submodule ``qualified`` (a dotted name) is; returns the old one.
    With ``keep_hooks`` the forward hooks and pre-hooks registered on the old module move to ``new``,
    beside those ``new`` has of its own."""
    parent, _, leaf = qualified.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    old = getattr(owner, leaf)
    if keep_hooks:
        for hooks in _HOOK_DICTS:
            kept = getattr(old, hooks)
            kept.update(getattr(new, hooks))  # and the new module's own (QuantHFAttention's capture hook)
            setattr(new, hooks, kept)
    setattr(owner, leaf, new)
    return old


class StopForward(Exception):
    """Raised by a hook to end a forward pass early: what the caller wanted from it is in hand, and
    the layers after the hook's need not run."""


@contextmanager
def removing_hooks(handles: Iterable[RemovableHandle]) -> Iterator[None]:
    """Keep the hooks of ``handles`` registered inside the block and remove them on leaving it,
    however it is left (the hooks of one pass over a model: capturing, calibrating, tracing)."""
    handles = list(handles)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def quantizers_of(model: nn.Module) -> Iterator[tuple[str, Quantizer]]:
    """All quantizers in ``model`` with their qualified names."""
    for name, module in model.named_modules():
        if isinstance(module, Quantizer):
            yield name, module


@contextmanager
def quantizers_set(model: nn.Module, **attributes: object) -> Iterator[nn.Module]:
    """Give every quantizer in ``model`` these attribute values inside the block; each quantizer's
    own values come back afterwards (e.g. ``quantizers_set(model, enabled=False)``)."""
    saved = [(q, {name: getattr(q, name) for name in attributes}) for _, q in quantizers_of(model)]
    for q, _ in saved:
        for name, value in attributes.items():
            setattr(q, name, value)
    try:
        yield model
    finally:
        for q, values in saved:
            for name, value in values.items():
                setattr(q, name, value)


def quantizers_off(model: nn.Module) -> AbstractContextManager[nn.Module]:
    """Run ``model`` as float inside the block (e.g. a probe pass before calibration); each
    quantizer's own on/off state comes back afterwards."""
    return quantizers_set(model, enabled=False)


@torch.no_grad()
def float_logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The output of ``model`` with every quantizer off (its float function); each quantizer's own
    on/off state comes back afterwards."""
    with quantizers_off(model):
        return model(images)


@contextmanager
def constant_quantization(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, with autograd off, each quantizer computes its quantized weight and its
    level table once and reuses them (``Quantizer.remembered``): what an evaluation loop, where
    nothing changes between batches, wants. Leaving the block forgets them."""
    with quantizers_set(model, memoize=True):
        try:
            yield model
        finally:
            for _, q in quantizers_of(model):
                q._memos.clear()


def quantized_weight(layer: nn.Module) -> UniformQuantizer | None:
    """The quantizer of ``layer``'s weight where the weight is stored as integer codes: an enabled
    uniform ``weight_quantizer`` of a ``QuantLinear`` or ``QuantConv2d``; ``None`` otherwise. The one
    rule that saving, GPTQ, reconstruction, the float64 copy and the export share."""
    if not isinstance(layer, (QuantLinear, QuantConv2d)):
        return None
    q = layer.weight_quantizer
    return q if isinstance(q, UniformQuantizer) and q.enabled else None


def weight_quantizer_ids(model: nn.Module) -> set[int]:
    """The ``id`` of every quantizer that quantizes a layer's weight: a ``QuantLinear``'s or
    ``QuantConv2d``'s ``weight_quantizer`` and any quantizer inside it (a learned rounding's base).
    Roles come from the layer slot a quantizer sits in, not from its name."""
    return {
        id(q)
        for layer in model.modules()
        if isinstance(layer, (QuantLinear, QuantConv2d))
        for q in layer.weight_quantizer.modules()
        if isinstance(q, Quantizer)
    }


def set_quantization(model: nn.Module, weights: bool = True, activations: bool = True) -> nn.Module:
    """Switch weight and activation quantization on or off; returns ``model``."""
    weight_ids = weight_quantizer_ids(model)
    for _, q in quantizers_of(model):
        q.enabled = weights if id(q) in weight_ids else activations
    return model


class Float64Model(nn.Module):
    """A float64 model behind a float32 interface: float32 images in, float32 logits out."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.double()).float()


@torch.no_grad()
def float64_copy(model: nn.Module) -> Float64Model:
    """A float64 copy of a quantized model that computes the same quantized function, with float
    rounding ~1e-16 instead of ~1e-7: no code moves with the thread count or the runtime, and the
    float64 ONNX export (``export_onnx(..., float_dtype="float64")``) gives the same logits.

    The weights keep the float32 model's integer codes (re-rounding ``w / s`` in float64 can pick
    another code for a weight within float32 rounding of a tie): each quantized weight becomes its
    codes dequantized in float64 and its quantizer is dropped. Activation quantizers, level tables
    (defined in float32, see ``TanQQuantizer.level_table``) and the float ops run in float64.
    """
    out = copy.deepcopy(model)
    for module in out.modules():
        q = quantized_weight(module)
        if q is not None:
            codes = q.codes(module.weight)
            q.double()
            module.weight = nn.Parameter(q.dequantize(codes.double()), requires_grad=False)
            module.weight_quantizer = nn.Identity()
    return Float64Model(out.double())


def in_dtype(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` itself for ``"float32"``, its :func:`float64_copy` for ``"float64"``."""
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"evaluation dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    return model if dtype == "float32" else float64_copy(model)
