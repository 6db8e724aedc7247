"""Architecture adapters, keyed by timm model class.

An adapter says which attention modules to swap (by type) and how to split the model into
units for block-wise work (reconstruction), using timm's public attributes only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from timm.layers import Attention
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.eva import Eva, EvaAttention
from timm.models.swin_transformer import SwinTransformer, WindowAttention
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.swin_transformer_v2 import WindowAttention as WindowAttentionV2
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from dopq.errors import ModelError
from dopq.models.attention import (
    QuantAttention,
    QuantBeitAttention,
    QuantEvaAttention,
    QuantWindowAttention,
    QuantWindowAttentionV2,
)

__all__ = ["ModelAdapter", "get_adapter", "list_families", "quantized_attention_classes", "register_adapter"]


@dataclass(frozen=True)
class ModelAdapter:
    """How dopq handles one timm model family.

    Args:
        family: short name used in reports and saved files.
        attention: timm attention class -> quantized replacement class.
        units: returns ``(name, module)`` of the model's blocks in forward order (patch embedding,
            transformer blocks, Swin patch merging, head).
    """

    family: str
    attention: dict[type[nn.Module], type[nn.Module]]
    units: Callable[[nn.Module], list[tuple[str, nn.Module]]]


_ADAPTERS: dict[type[nn.Module], ModelAdapter] = {}


def register_adapter(model_cls: type[nn.Module], adapter: ModelAdapter) -> None:
    """Register ``adapter`` for ``model_cls``; a second registration raises."""
    if model_cls in _ADAPTERS:
        raise ValueError(f"an adapter for {model_cls.__name__} is already registered")
    _ADAPTERS[model_cls] = adapter


def quantized_attention_classes() -> tuple[type[nn.Module], ...]:
    """Every attention module class the registered adapters swap in."""
    return tuple({cls for a in _ADAPTERS.values() for cls in a.attention.values()})


def list_families() -> list[str]:
    return sorted(a.family for a in _ADAPTERS.values())


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter of ``model``'s class (or of its closest registered base class); for a wrapper of
    another library's model (``dopq.models.hf``), of the wrapped model's class."""
    wrapped = getattr(model, "wrapped_model", None)
    for cls in type(model if wrapped is None else wrapped).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    inner = next((n for n in ("module", "_orig_mod") if isinstance(getattr(model, n, None), nn.Module)), None)
    if inner is not None:  # nn.DataParallel / DistributedDataParallel, torch.compile's OptimizedModule
        raise ModelError(
            f"{type(model).__name__} is a wrapper: quantize the model it wraps (model.{inner}), then "
            "wrap the quantized model"
        )
    names = ", ".join(c.__name__ for c in _ADAPTERS)
    raise ModelError(
        f"unsupported model family {type(model).__name__}: dopq supports {names} "
        "(transformers ViT, DeiT, Swin, BEiT and DINOv2 classifiers through hf:FOLDER)"
    )


def _vit_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    units = [("patch_embed", model.patch_embed)]
    units += [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    units.append(("head", model.head))
    if getattr(model, "head_dist", None) is not None:
        units.append(("head_dist", model.head_dist))
    return units


def _swin_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    units = [("patch_embed", model.patch_embed)]
    for i, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, nn.Identity):
            units.append((f"layers.{i}.downsample", stage.downsample))
        units += [(f"layers.{i}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
    units.append(("head", model.head))
    return units


register_adapter(VisionTransformer, ModelAdapter("vit", {Attention: QuantAttention}, _vit_units))
register_adapter(SwinTransformer, ModelAdapter("swin", {WindowAttention: QuantWindowAttention}, _swin_units))
register_adapter(Beit, ModelAdapter("beit", {BeitAttention: QuantBeitAttention}, _vit_units))
register_adapter(
    SwinTransformerV2, ModelAdapter("swinv2", {WindowAttentionV2: QuantWindowAttentionV2}, _swin_units)
)
register_adapter(Eva, ModelAdapter("eva", {EvaAttention: QuantEvaAttention}, _vit_units))
