"""Model adapters: find quantization sites of timm ViT/DeiT/Swin structurally and wrap them."""

from dopq.models.adapters import ModelAdapter, get_adapter, list_families, register_adapter
from dopq.models.attention import (
    QKVPath,
    QuantAttention,
    QuantWindowAttention,
    ValuePath,
    qkv_paths,
    value_paths,
)
from dopq.models.coverage import Coverage, measure_coverage, softmax_kinds, softmax_off_grid
from dopq.models.loading import build_model, card_for, load_state_dict
from dopq.models.prepare import QuantPlan, example_input, prepare_model
from dopq.models.structure import LayerNormPair, find_layernorm_pairs

__all__ = [
    "Coverage",
    "LayerNormPair",
    "ModelAdapter",
    "QKVPath",
    "QuantAttention",
    "QuantPlan",
    "QuantWindowAttention",
    "ValuePath",
    "build_model",
    "card_for",
    "example_input",
    "find_layernorm_pairs",
    "get_adapter",
    "list_families",
    "load_state_dict",
    "measure_coverage",
    "prepare_model",
    "qkv_paths",
    "register_adapter",
    "softmax_kinds",
    "softmax_off_grid",
    "value_paths",
]
