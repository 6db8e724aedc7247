"""The deploy form of a quantized model: integer weights, per-tensor activation Q/DQ, post-Softmax
codes counted against the quantizer's own decision points. It is built from the quantizers' own API
(``codes``, ``dequantize``, ``level_table``, ``decision_points``, the warp parameters) and computes
in torch what the exported ONNX graph computes.

:func:`to_deploy` swaps, in a copy, every ``QuantLinear`` / ``QuantConv2d`` / ``QuantMatMul`` for a
deploy module; everything else (LayerNorm, Softmax, GELU, residual adds, position embeddings and
Swin's relative position bias) stays float. The post-LayerNorm input offset (``ln_shift=input``,
per-channel integer zero points) is folded into the bias with the *quantized* weights, so every
activation stays per tensor: ``(x + o) W^T + b = x W^T + (W o + b)``.

``dtype=torch.float64`` builds the float64 form: the float parts (LayerNorm, Softmax, residual
adds, scales) run in float64, activations are quantized to uint8 codes by float64 ops and every
quantized product is an ``integer_matmul`` (``MatMulInteger``, exact int32 sums). Float32 rounding
differences are far too small to move any float64 value across a rounding boundary, so this form
computes the simulation's codes in any runtime and on any thread count (docs/export.md). This
torch form computes GELU in float64, as the simulation does; onnxruntime has no float64 ``erf``, so
the export rewrites the graph's GELU into nodes that give the same codes
(:mod:`dopq.export.float64_gelu`). One step of the exported graph stays float32: the post-Softmax
code rule above ``EXACT_LEVELS_MAX_BITS``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from dopq.config import RUNTIMES, WEIGHT_TYPES
from dopq.errors import ExportError
from dopq.export.linear import DeployConv2d, DeployLinear
from dopq.export.matmul import DeployMatMul
from dopq.export.qdq import ActivationQDQ, symmetric_target
from dopq.export.runtime import saturating_cpu
from dopq.modules import (
    Float64Model,
    QuantConv2d,
    QuantLinear,
    QuantMatMul,
    quantizers_of,
    replace_module,
)

__all__ = [
    "TARGETS",
    "WEIGHT_TYPES",
    "check_quantized",
    "default_weight_type",
    "to_deploy",
]


def check_quantized(model: nn.Module) -> None:
    """Refuse a model without calibrated quantizers (a float model, or one still to calibrate)."""
    quantizers = list(quantizers_of(model))
    if not quantizers:
        raise ExportError(
            "the model has no quantizers: quantize it first (dopq.quantize / dopq quantize --save)"
        )
    missing = [name for name, q in quantizers if not q.is_ready()]
    if missing:
        raise ExportError(f"{len(missing)} quantizers were never calibrated (e.g. {missing[0]})")


TARGETS = RUNTIMES  # the runtimes a float32 graph can be shaped for


def _clip_codes_after_quantizing(deploy: nn.Module) -> None:
    """Below 8 bits, every activation's b-bit range is clipped on its uint8 codes (onnxruntime,
    whose fusions take them: one DeiT-Tiny W4/A4 export ran about a tenth faster); OpenVINO keeps
    the float ``Clip`` before its quantization."""
    for module in deploy.modules():
        if isinstance(module, ActivationQDQ):
            module.clip_codes = True


class ExplicitRmsNorm(nn.Module):
    """RMS normalization in elementary ops: the TorchScript exporter has no ``aten::rms_norm`` below
    ONNX opset 23. In float64, torch's own order, ``x * rsqrt(mean(x^2) + eps) * weight`` (the float64
    file stays the float64 simulation exactly); in float32 the weight first, ``(x * weight) * rsqrt(...)``:
    OpenVINO fuses torch's order into its RMS op, which, where a mean over the tokens and a quantizer
    follow (AIMv2's pooled head), moved a tiny AIMv2's W8/A8 logits by a few hundredths of their
    spread (a session-38 probe)."""

    def __init__(self, norm: nn.Module, weight_first: bool) -> None:
        super().__init__()
        shape = norm.normalized_shape
        self.dims = tuple(range(-(len(shape) if isinstance(shape, tuple | list) else 1), 0))
        self.eps = norm.eps
        self.weight = getattr(norm, "weight", None)
        self.weight_first = weight_first and self.weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        inverse_rms = torch.rsqrt(x.pow(2).mean(self.dims, keepdim=True) + eps)
        if self.weight_first:
            return (x * self.weight) * inverse_rms
        y = x * inverse_rms
        return y if self.weight is None else y * self.weight


def _rms_norm_classes() -> tuple[type[nn.Module], ...]:
    """Norm classes whose forward is ``F.rms_norm`` (timm's ``RmsNorm``, torch's ``RMSNorm``)."""
    import timm.layers

    return tuple(c for c in (getattr(timm.layers, "RmsNorm", None), getattr(nn, "RMSNorm", None)) if c)


def _traceable(deploy: nn.Module, dtype: torch.dtype) -> None:
    """Float modules the exporter cannot trace as they are, rewritten to the same function: RMS norms
    in elementary ops, and timm attention left float (``--allow-partial``) on its explicit path
    (its fused ``scaled_dot_product_attention`` call does not trace)."""
    rms = _rms_norm_classes()
    for name, module in list(deploy.named_modules()):
        if type(module) in rms:
            replace_module(deploy, name, ExplicitRmsNorm(module, weight_first=dtype == torch.float32))
        elif getattr(module, "fused_attn", False) is True:
            module.fused_attn = False


def _copy_without_quantized_weights(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose quantized layers read the model's own float weights: the
    deploy form replaces those layers by their integer codes, so copying the weights only to drop
    them had a model of 86 M weights (ViT-B) hold a second float copy through the export. Each
    shared weight is a new ``Parameter`` over the same data, so ``.cpu()`` on the copy moves the
    copy's alone; the export only reads them."""
    memo: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            memo[id(module.weight)] = nn.Parameter(module.weight.detach(), requires_grad=False)
    return copy.deepcopy(model, memo)


def default_weight_type(dtype: torch.dtype = torch.float32, target: str = "onnxruntime") -> str:
    """The container of 8-bit weight codes when none is asked for: uint8 in float64 (whose
    ``MatMulInteger`` products must be exact everywhere) and, for onnxruntime, on a CPU whose uint8 x
    int8 sums saturate (:func:`~dopq.export.runtime.saturating_cpu`: there uint8 is exact and the
    faster form); else int8, the fast exact form on VNNI / AMX CPUs and the only one OpenVINO takes."""
    if dtype == torch.float64:
        return "uint8"
    return "uint8" if target == "onnxruntime" and saturating_cpu() is not None else "int8"


@torch.no_grad()
def to_deploy(
    model: nn.Module,
    integer_levels: bool = False,
    dtype: torch.dtype = torch.float32,
    target: str = "onnxruntime",
    weight_type: str | None = None,
) -> nn.Module:
    """A CPU copy of a quantized model in deploy form (the model itself is not changed).

    Args:
        model: a model returned by :func:`dopq.quantize` (or loaded with ``load_quantized``).
        integer_levels: round post-Softmax levels to 8-bit fixed point for an integer ``attn @ v``.
        dtype: ``torch.float32`` (QDQ, onnxruntime's fused integer kernels, the fast form) or
            ``torch.float64`` (the float parts in float64: the simulation's codes on any runtime).
        target: the runtime whose integer kernels the float32 form is shaped for (``TARGETS``):
            ``onnxruntime`` (weights with zero points) or ``openvino`` (every integer operand
            without zero points, their share subtracted from row sums). The same codes either way.
        weight_type: the container of 8-bit weight codes for onnxruntime (:data:`WEIGHT_TYPES`):
            ``int8`` (fast; exact on CPUs with VNNI) or ``uint8`` (exact on every CPU). None:
            :func:`default_weight_type`. OpenVINO's kernels take int8 weights only.
    """
    check_quantized(model)
    if target not in TARGETS:
        raise ExportError(f"unknown export target {target!r}: use one of {', '.join(TARGETS)}")
    if dtype not in (torch.float32, torch.float64):
        raise ExportError(f"the deploy form is float32 or float64, not {dtype}")
    weight_type = weight_type or default_weight_type(dtype, target)
    if weight_type not in WEIGHT_TYPES:
        raise ExportError(f"unknown weight type {weight_type!r}: use one of {', '.join(WEIGHT_TYPES)}")
    if weight_type == "uint8" and symmetric_target(target, dtype):
        raise ExportError("OpenVINO's integer kernels take int8 weights: drop --export-weight-type uint8")
    deploy = _copy_without_quantized_weights(model).cpu().eval()
    _traceable(deploy, dtype)
    quantized = [
        name for name, m in deploy.named_modules() if isinstance(m, (QuantLinear, QuantConv2d, QuantMatMul))
    ]
    for name in quantized:
        module = deploy.get_submodule(name)
        if isinstance(module, QuantLinear):
            replace_module(deploy, name, DeployLinear(module, name, dtype, target, weight_type))
        elif isinstance(module, QuantConv2d):
            replace_module(deploy, name, DeployConv2d(module, name, dtype, weight_type))
        else:
            replace_module(deploy, name, DeployMatMul(module, name, integer_levels, dtype, target))
    if dtype == torch.float32:
        if target == "onnxruntime":
            _clip_codes_after_quantizing(deploy)
        return deploy
    return Float64Model(deploy.to(torch.float64))  # float buffers to float64; codes stay integer
