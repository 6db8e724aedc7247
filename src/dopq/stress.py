"""Stress cases with the properties of ImageNet-trained ViTs that the small reference models lack.

* :func:`rescale_layernorm_channels`: a function-preserving rescale that gives a few post-LayerNorm
  channels 10-40x larger ranges (LayerNorm gamma/beta of channel c times s_c, the consumer's input
  column c divided by s_c), the inter-channel outliers that MOSF targets.
* :func:`powerlaw_attention`: attention rows with a power-law body and a tail near 1, the
  post-Softmax distribution that TanQ targets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dopq.models.prepare import example_input
from dopq.models.structure import find_layernorm_pairs

__all__ = ["powerlaw_attention", "rescale_layernorm_channels"]


@torch.no_grad()
def rescale_layernorm_channels(
    model: nn.Module,
    n_channels: int = 4,
    factor_range: tuple[float, float] = (10.0, 40.0),
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Scale ``n_channels`` random channels of every paired LayerNorm; the model's function is kept.

    Args:
        model: a float timm model (changed in place).
        n_channels: channels per LayerNorm to blow up.
        factor_range: the factors are drawn uniformly from this range.
        seed: seed of the channel and factor choice.

    Returns:
        ``{layernorm name: {"channels": [...], "factors": [...]}}``.
    """
    gen = torch.Generator().manual_seed(seed)
    info: dict[str, dict[str, Any]] = {}
    for pair in find_layernorm_pairs(model.eval(), example_input(model)):
        norm = model.get_submodule(pair.norm)
        dim = norm.weight.numel()
        channels = torch.randperm(dim, generator=gen)[:n_channels]
        lo, hi = factor_range
        factors = lo + (hi - lo) * torch.rand(n_channels, generator=gen)
        scale = torch.ones(dim)
        scale[channels] = factors
        norm.weight.mul_(scale)
        norm.bias.mul_(scale)
        for name in pair.linears:
            model.get_submodule(name).weight.div_(scale)
        info[pair.norm] = {"channels": channels.tolist(), "factors": factors.tolist()}
    return info


def powerlaw_attention(
    shape: tuple[int, ...] = (8, 3, 64, 64),
    alpha: float = 1.2,
    peak_fraction: float = 0.3,
    seed: int = 0,
) -> torch.Tensor:
    """Softmax rows whose logits follow a power law, with a fraction of rows peaked near 1.

    Args:
        shape: ``(..., N, N)``.
        alpha: Pareto tail index of the logit magnitudes (smaller = heavier tail).
        peak_fraction: fraction of rows where one token takes most of the mass (values near 1).
        seed: RNG seed.
    """
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=gen).clamp_min(1e-6)
    logits = u.pow(-1.0 / alpha)  # Pareto(alpha) magnitudes
    peaked = torch.rand((*shape[:-1], 1), generator=gen) < peak_fraction
    boost = torch.zeros(shape)
    idx = torch.randint(shape[-1], (*shape[:-1], 1), generator=gen)
    boost.scatter_(-1, idx, 12.0)
    logits = logits + boost * peaked
    return torch.softmax(logits, dim=-1)
