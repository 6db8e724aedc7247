"""Value centring: a float re-parameterization that moves each channel's mean out of attention's v.

Every Softmax row sums to 1, so ``attn @ (v - c) + c = attn @ v`` for any per-channel constant
``c``. Taking ``c`` (v's calibration mean) out through the v rows of the projection that makes v, and
giving it back through the bias of the Linear that reads ``attn @ v`` (``bias += W c``), keeps the
float function and leaves v's bulk on 0: where v's grid is centred on 0 (``symmetric_attention=
"qkv"``, what lets OpenVINO fuse a whole attention into one integer kernel) no code range is spent
on the offset. Runs before calibration, on float forwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dopq.models import ValuePath, value_paths
from dopq.models.adapters import quantized_attention_classes
from dopq.modules import quantizers_off, removing_hooks
from dopq.reparam import check_float_change

__all__ = ["CentringReport", "centre_values", "fold_value_offset"]


@dataclass
class CentringReport:
    """What value centring did: the largest offset removed per attention module, the attention modules
    it could not centre (something between ``attn @ v`` and the output projection, or not reached by
    the images) and the float check."""

    offsets: dict[str, float] = field(default_factory=dict)
    max_logit_change: float = 0.0
    skipped: list[str] = field(default_factory=list)


def fold_value_offset(path: ValuePath, offset: torch.Tensor) -> None:
    """Take ``offset`` (one value per v channel) out of v and give it back after ``attn @ v``."""
    with torch.no_grad():
        c = offset.double()
        producer, consumer = path.producer, path.consumer
        if producer.bias is None:
            producer.bias = nn.Parameter(torch.zeros_like(producer.weight[:, 0]))
        producer.bias[path.rows] = (producer.bias[path.rows].double() - c).to(producer.bias.dtype)
        given_back = consumer.weight.double() @ c
        if consumer.bias is None:
            consumer.bias = nn.Parameter(given_back.to(consumer.weight.dtype))
        else:
            consumer.bias.copy_(consumer.bias.double() + given_back)


def _value_means(
    model: nn.Module, paths: dict[str, ValuePath], images: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-channel means of each module's v over every token of ``images`` (one float forward)."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str, rows: slice):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            v = output[..., rows].detach()
            v = v.reshape(-1, v.shape[-1]).double()
            sums[name] = sums.get(name, 0) + v.sum(0)
            counts[name] = counts.get(name, 0) + v.shape[0]

        return hook

    with removing_hooks([p.producer.register_forward_hook(hook_for(n, p.rows)) for n, p in paths.items()]):
        model(images)
    return {n: sums[n] / counts[n] for n in sums}


@torch.no_grad()
def centre_values(
    model: nn.Module, images: torch.Tensor, check_images: int = 4, tolerance: float = 1e-3
) -> CentringReport:
    """Centre v on its calibration mean, per channel, in every attention module where it can be given
    back in the output projection's bias (:meth:`value_path`); the others are left as they are.

    Args:
        model: a prepared (quantized, not yet calibrated) model.
        images: the calibration batch.
        check_images: how many of ``images`` the float logits are compared on, before and after.
        tolerance: largest float logit change allowed, relative to the largest logit.

    Returns:
        The largest removed offset per module and the measured float logit change.

    Raises:
        RuntimeError: if the float function changed beyond ``tolerance`` (v or ``attn @ v`` is read
            by something a :class:`ValuePath` does not account for).
    """
    paths = value_paths(model)
    attentions = [n for n, m in model.named_modules() if isinstance(m, quantized_attention_classes())]
    report = CentringReport(skipped=[n for n in attentions if n not in paths])
    if not paths:
        return report
    with quantizers_off(model):
        before = model(images[:check_images])
        means = _value_means(model, paths, images)
        for name, path in paths.items():
            if name not in means:  # a module this input never reaches
                report.skipped.append(name)
                continue
            fold_value_offset(path, means[name])
            report.offsets[name] = float(means[name].abs().max())
        after = model(images[:check_images])
    report.max_logit_change = check_float_change(
        before,
        after,
        tolerance,
        "value centring",
        "an attention's v or attn @ v is read by something besides its projections",
    )
    return report
