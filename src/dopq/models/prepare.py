"""Turn a float timm model into a quantized one, in place, following the recipe's placement.

Placement (RepQ-ViT): every Linear and Conv2d gets a per-output-channel weight quantizer; the
patch embedding's input is quantized at ``patch_embed_input_bits``; Linear layers fed by a
LayerNorm get a per-channel input quantizer (re-parameterized to per tensor later), all others per
tensor; both attention matmuls quantize their operands, the attention map with the recipe's
post-Softmax quantizer. With ``edge_w_bits`` the patch embedding's and the head's weights take
those bits instead of ``w_bits``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dopq.config import QuantConfig
from dopq.errors import ModelError
from dopq.models.adapters import ModelAdapter, get_adapter
from dopq.models.coverage import Coverage, measure_coverage
from dopq.models.structure import LayerNormPair, find_layernorm_pairs
from dopq.modules import QuantConv2d, QuantLinear, quantizers_off, replace_module
from dopq.quantizers import PerChannel, PerTensor, Quantizer, UniformQuantizer, build_quantizer
from dopq.quantizers.uniform import OUTPUT_PERCENTILES

__all__ = ["QuantPlan", "edge_layers", "example_input", "prepare_model"]


@dataclass
class QuantPlan:
    """What ``prepare_model`` found: the family, the LayerNorm -> Linear pairs and the coverage."""

    adapter: ModelAdapter
    pairs: list[LayerNormPair]
    coverage: Coverage | None = None

    @property
    def paired_linears(self) -> set[str]:
        return {name for p in self.pairs for name in p.linears}


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A zero image batch of the model's input size."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    img = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img is not None:
        size = (3, *img)
    size = size or (3, 224, 224)
    device = next(model.parameters()).device
    return torch.zeros(batch, *size, device=device)


_CENTRED_OPERANDS = {"off": (), "qk": ("q", "k"), "qkv": ("q", "k", "v")}  # QuantConfig.symmetric_attention


class _Factory:
    def __init__(self, config: QuantConfig) -> None:
        self.c = config

    def weight(self, bits: int | None = None) -> Quantizer:
        return UniformQuantizer(
            bits or self.c.w_bits,
            PerChannel(0),
            self.c.percentiles,
            symmetric=self.c.symmetric_weights,
            zero_in_range=True,  # integer weight formats hold the zero point as a code
        )

    def act(self, per_channel: bool = False, bits: int | None = None, symmetric: bool = False) -> Quantizer:
        if per_channel:
            percentiles = self.c.act_percentiles or self.c.percentiles
            return UniformQuantizer(bits or self.c.a_bits, PerChannel(-1), percentiles, symmetric=symmetric)
        objective = self.c.act_range_objective
        default = OUTPUT_PERCENTILES if objective == "output" else self.c.percentiles
        percentiles = self.c.act_percentiles or default
        return UniformQuantizer(
            bits or self.c.a_bits, PerTensor(), percentiles, symmetric=symmetric, objective=objective
        )

    def attention_operand(self, role: str) -> Quantizer:
        """``q``, ``k`` or ``v`` (``role``) of an attention product: per tensor, centred on 0 where the
        recipe's ``symmetric_attention`` names it."""
        return self.act(symmetric=role in _CENTRED_OPERANDS[self.c.symmetric_attention])

    def softmax(self) -> Quantizer:
        name = self.c.softmax_quantizer
        tanq = {
            "objective": self.c.tanq_objective,
            "centers": self.c.tanq_centers,
            "grid_bits": self.c.softmax_grid_bits,
        }
        if name == "tanq":
            return build_quantizer(name, self.c.a_bits, **tanq)
        if name == "auto":
            return build_quantizer(name, self.c.a_bits, percentiles=self.c.percentiles, **tanq)
        if name == "uniform":
            return self.act()
        return build_quantizer(name, self.c.a_bits, percentiles=self.c.percentiles)


def _check_no_shared_parameters(model: nn.Module) -> None:
    """Refuse a model where a parameter of a layer dopq changes (a Linear or Conv2d's weights, a
    LayerNorm's affine) is also registered elsewhere (tied weights, one layer in two places): each
    layer is re-parameterized and rounded for itself, which would change the other user. Its
    float-function check then failed, blaming a LayerNorm read by something other than its pair."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.LayerNorm)):
            for parameter in module.parameters(recurse=False):
                if len(names[id(parameter)]) > 1:
                    first, second = names[id(parameter)][:2]
                    raise ModelError(
                        f"{first} and {second} are one shared parameter (tied weights): dopq changes "
                        "each layer's weights for that layer; give each layer its own copy first"
                    )


def edge_layers(model: nn.Module, adapter: ModelAdapter) -> set[str]:
    """Names of the Linear / Conv2d layers in the units before the first attention module and after
    the last one: the patch embedding and the classifier head(s), whatever they are called."""
    units = adapter.units(model)
    has_attention = [any(type(m) in adapter.attention for m in unit.modules()) for _, unit in units]
    if not any(has_attention):
        return set()
    first, last = has_attention.index(True), len(units) - 1 - has_attention[::-1].index(True)
    edges = {id(m) for _, unit in units[:first] + units[last + 1 :] for m in unit.modules()}
    return {n for n, m in model.named_modules() if id(m) in edges and type(m) in (nn.Linear, nn.Conv2d)}


def prepare_model(model: nn.Module, config: QuantConfig, allow_partial: bool = False) -> QuantPlan:
    """Insert quantizers into ``model`` in place (all start uncalibrated).

    Args:
        model: a timm VisionTransformer/SwinTransformer in eval mode.
        config: the recipe.
        allow_partial: accept Linear, Conv2d or attention modules dopq cannot quantize (they stay
            float and the plan's coverage lists them) instead of refusing the model.

    Returns:
        The plan (family, LayerNorm -> Linear pairs, coverage) that calibration and
        re-parameterization use.

    Raises:
        ModelError: something would stay float and ``allow_partial`` is off; layers share a parameter.
    """
    adapter = get_adapter(model)
    _check_no_shared_parameters(model)
    device = next(model.parameters()).device
    model.eval()
    make = _Factory(config)
    edges = edge_layers(model, adapter) if config.edge_w_bits is not None else set()
    for name, module in list(model.named_modules()):
        quant_cls = adapter.attention.get(type(module))
        if quant_cls is not None:
            qk = (make.attention_operand("q"), make.attention_operand("k"))
            av = (make.softmax(), make.attention_operand("v"))
            replace_module(model, name, quant_cls(module, qk, av), keep_hooks=True)
    model.to(device)
    # pairs are traced through dopq's attention modules, which call their Linear layers as modules
    # (timm's BEiT attention calls F.linear on its qkv weight, which no module hook would see)
    with quantizers_off(model):
        pairs = find_layernorm_pairs(model, example_input(model))
    paired = {name for p in pairs for name in p.linears}
    for name, module in list(model.named_modules()):
        if type(module) not in (nn.Linear, nn.Conv2d):
            continue
        weight = make.weight(config.edge_w_bits if name in edges else None)
        if type(module) is nn.Linear:
            new = QuantLinear(module, make.act(per_channel=name in paired), weight)
        else:
            new = QuantConv2d(module, make.act(bits=config.patch_embed_input_bits), weight)
        replace_module(model, name, new, keep_hooks=True)
    model.to(device)  # the new quantizer buffers follow the model
    coverage = measure_coverage(model, example_input(model), len(pairs))
    if not coverage.complete and not allow_partial:
        left = "; ".join(
            f"{kind}: {', '.join(names[:3])}" for kind, names in coverage.left_float.items() if names
        )
        raise ModelError(
            f"dopq cannot quantize every layer of this {type(model).__name__} ({left}); "
            "pass --allow-partial (allow_partial=True) to quantize the rest and keep these float"
        )
    return QuantPlan(adapter, pairs, coverage)
