"""Explicit quantized attention modules built from timm's public attributes.

The adapter swaps a whole timm attention module for one of these: no patched ``forward`` and no
reliance on ``fused_attn``. ``q @ k^T`` and ``attn @ v`` are ``QuantMatMul`` children, so their
quantizers are ordinary named slots. With quantizers disabled the result equals timm's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import nn

from dopq.modules import QuantMatMul
from dopq.quantizers import Quantizer

__all__ = [
    "QKVPath",
    "QuantAttention",
    "QuantBeitAttention",
    "QuantEvaAttention",
    "QuantWindowAttention",
    "QuantWindowAttentionV2",
    "ValuePath",
    "qkv_paths",
    "value_paths",
]


def _additive_mask(attn_mask: torch.Tensor | None, n: int, like: torch.Tensor, is_causal: bool):
    if is_causal:
        return like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros_like(attn_mask, dtype=like.dtype).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


def _add_window_mask(attn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``attn`` (batch * windows, heads, n, n) plus the shifted-window ``mask`` (windows, n, n) of each
    window, broadcast over the batch and the heads as timm does: an exported graph keeps the mask and
    the position bias apart (a few hundred kB) instead of folding their sum per window (megabytes)."""
    windows, n = mask.shape[0], mask.shape[-1]
    heads = attn.shape[1]
    return (attn.view(-1, windows, heads, n, n) + mask.unsqueeze(1)).view(-1, heads, n, n)


@dataclass(frozen=True)
class ValuePath:
    """Where an attention's ``v`` comes from and where ``attn @ v`` goes: ``v`` (heads concatenated)
    is output rows ``rows`` of ``producer``, and ``consumer`` reads ``attn @ v`` with only the heads
    rearranged in between. A per-channel constant taken out of ``v`` through ``producer``'s bias can
    then be given back through ``consumer``'s bias (each Softmax row sums to 1)."""

    producer: nn.Linear
    rows: slice
    consumer: nn.Linear


@dataclass(frozen=True)
class QKVPath:
    """Where an attention's q, k and v come from: output rows ``q``, ``k`` and ``v`` of one fused
    Linear ``producer``, which reach ``q @ k^T`` and ``attn @ v`` with only the heads rearranged in
    between, and ``q @ k^T`` is multiplied by the module's float ``scale``. Rows of q scaled by ``a``
    and of k by ``b`` with ``scale`` divided by ``a b`` then leave the attention unchanged."""

    producer: nn.Linear
    q: slice
    k: slice
    v: slice


class _MatMulSlots(nn.Module):
    def value_path(self) -> ValuePath | None:
        """The module's :class:`ValuePath`, or None where something else sits between ``attn @ v``
        and the output projection (a norm, a gate)."""
        return None

    def qkv_path(self) -> QKVPath | None:
        """The module's :class:`QKVPath`, or None where q and k change on their way to ``q @ k^T``
        (a norm, a rotary embedding) or come from separate projections."""
        return None

    def _init_matmuls(
        self,
        qk: tuple[Quantizer | None, Quantizer | None],
        av: tuple[Quantizer | None, Quantizer | None],
    ) -> None:
        self.matmul_qk = QuantMatMul(*qk)
        self.matmul_av = QuantMatMul(*av)

    def _attend(self, *operands: torch.Tensor | None) -> torch.Tensor:
        """``attn @ v`` alone: :meth:`_attend_with_map`'s first output."""
        return self._attend_with_map(*operands)[0]

    def _attend_with_map(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        window_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``attn @ v`` and the attention map (post-Softmax, before its quantizer)."""
        # the scale is applied after the product, as RepQ-ViT does; the quantized q is unscaled
        attn = self.matmul_qk(q, k.transpose(-2, -1)) * self.scale
        if bias is not None:
            attn = attn + bias
        if window_mask is not None:
            attn = _add_window_mask(attn, window_mask)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.matmul_av(attn, v), attn


class QuantAttention(_MatMulSlots):
    """Quantized version of ``timm.layers.Attention`` (ViT, DeiT).

    Args:
        attn: the timm module; its ``qkv``, ``proj``, norms, dropouts and gate are reused.
        qk: quantizers for the two operands of ``q @ k^T``.
        av: quantizers for the attention map (post-Softmax) and ``v``.
    """

    def __init__(self, attn: nn.Module, qk: tuple, av: tuple) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name, None) or nn.Identity())
        self.gate = getattr(attn, "gate", None)
        self._init_matmuls(qk, av)

    def value_path(self) -> ValuePath | None:
        if not isinstance(self.norm, nn.Identity) or self.gate is not None:
            return None
        return _third_of_qkv(self.qkv, self.proj)

    def qkv_path(self) -> QKVPath | None:
        if not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity)):
            return None
        return _thirds(self.qkv)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = self._attend(q, k, v, _additive_mask(attn_mask, n, q, is_causal))
        x = self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class QuantWindowAttention(_MatMulSlots):
    """Quantized version of timm's Swin ``WindowAttention``; the relative position bias and the
    shift mask are added in float, as in RepQ-ViT."""

    def __init__(self, attn: nn.Module, qk: tuple, av: tuple) -> None:
        super().__init__()
        self.num_heads, self.scale, self.window_area = attn.num_heads, attn.scale, attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        for name in ("qkv", "attn_drop", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        self._init_matmuls(qk, av)

    def value_path(self) -> ValuePath | None:
        return _third_of_qkv(self.qkv, self.proj)

    def qkv_path(self) -> QKVPath | None:
        return _thirds(self.qkv)

    def relative_position_bias(self) -> torch.Tensor:
        n = self.window_area
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self._window_attention(q, k, v, mask)

    def _window_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, _, n, _ = q.shape
        x = self._attend(q, k, v, self.relative_position_bias(), mask)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, -1)))


def _third_of_qkv(qkv: nn.Module, proj: nn.Module) -> ValuePath | None:
    """v is the last third of a fused ``qkv`` Linear's output (timm's ``reshape(b, n, 3, heads, d)``)."""
    thirds = _thirds(qkv)
    if thirds is None or not isinstance(proj, nn.Linear):
        return None
    return ValuePath(qkv, thirds.v, proj)


def _thirds(qkv: nn.Module) -> QKVPath | None:
    """q, k and v as the three thirds of a fused ``qkv`` Linear's output (timm's layout)."""
    if not isinstance(qkv, nn.Linear):
        return None
    c = qkv.out_features // 3
    return QKVPath(qkv, slice(0, c), slice(c, 2 * c), slice(2 * c, 3 * c))


def _paths(model: nn.Module, path_of: Callable[[_MatMulSlots], Any]) -> dict[str, Any]:
    found = {}
    for name, module in model.named_modules():
        path = path_of(module) if isinstance(module, _MatMulSlots) else None
        if path is not None:
            found[name] = path
    return found


def qkv_paths(model: nn.Module) -> dict[str, QKVPath]:
    """Every quantized attention module of ``model`` (by qualified name) with a :class:`QKVPath`."""
    return _paths(model, lambda module: module.qkv_path())


def value_paths(model: nn.Module) -> dict[str, ValuePath]:
    """Every quantized attention module of ``model`` (by qualified name) whose ``v`` can be shifted."""
    return _paths(model, lambda module: module.value_path())


def _qkv_with_bias(attn: nn.Module) -> nn.Linear:
    """One ``qkv`` Linear sharing the timm module's weight, with its q/v biases (and the zero k bias)
    as the Linear's bias: the function of timm's ``F.linear(x, qkv.weight, cat(q, k, v biases))``."""
    old = attn.qkv
    qkv = nn.Linear(old.in_features, old.out_features, bias=attn.q_bias is not None)
    qkv.weight = old.weight
    if attn.q_bias is not None:
        qkv.bias = nn.Parameter(torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)).detach())
    return qkv


class QuantBeitAttention(_MatMulSlots):
    """Quantized version of timm's BEiT ``Attention``: the q/v biases become the bias of one
    ``qkv`` Linear (the same function as timm's ``F.linear`` with the concatenated bias), and the
    relative position bias (own and shared) is added in float, as Swin's."""

    def __init__(self, attn: nn.Module, qk: tuple, av: tuple) -> None:
        super().__init__()
        self.num_heads, self.scale, self.window_size = attn.num_heads, attn.scale, attn.window_size
        self.qkv = _qkv_with_bias(attn)
        self.relative_position_bias_table = attn.relative_position_bias_table
        if attn.relative_position_index is not None:
            self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        else:
            self.relative_position_index = None
        for name in ("attn_drop", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        self._init_matmuls(qk, av)

    def value_path(self) -> ValuePath | None:
        return _third_of_qkv(self.qkv, self.proj)

    def qkv_path(self) -> QKVPath | None:
        return _thirds(self.qkv)

    def relative_position_bias(self) -> torch.Tensor | None:
        if self.relative_position_bias_table is None:
            return None
        n = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_position_bias()
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        x = self._attend(q, k, v, bias)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class QuantWindowAttentionV2(QuantWindowAttention):
    """Quantized version of timm's Swin-V2 ``WindowAttention``: cosine attention, so ``q @ k^T``
    quantizes the L2-normalised q and k, and the learned per-head logit scale replaces
    ``1/sqrt(d)``. The continuous position bias (``16 sigmoid(cpb_mlp(coords))``) does not depend on
    the input: it is computed once, in float, and kept as a buffer."""

    def __init__(self, attn: nn.Module, qk: tuple, av: tuple) -> None:
        _MatMulSlots.__init__(self)
        self.num_heads, self.window_area = attn.num_heads, attn.window_size[0] * attn.window_size[1]
        self.logit_scale = attn.logit_scale
        self.qkv = _qkv_with_bias(attn)
        for name in ("attn_drop", "proj", "proj_drop"):
            setattr(self, name, getattr(attn, name))
        with torch.no_grad():
            table = attn.cpb_mlp(attn.relative_coords_table).view(-1, attn.num_heads)
            n = self.window_area
            bias = table[attn.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        self.register_buffer("position_bias", (16 * torch.sigmoid(bias)).unsqueeze(0).contiguous())
        self._init_matmuls(qk, av)

    def qkv_path(self) -> QKVPath | None:
        return None  # q and k are L2-normalised before q @ k^T

    @property
    def scale(self) -> torch.Tensor:  # read by _attend after q @ k^T
        return torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()

    def relative_position_bias(self) -> torch.Tensor:
        return self.position_bias

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return self._window_attention(F.normalize(q, dim=-1), F.normalize(k, dim=-1), v, mask)


class QuantEvaAttention(_MatMulSlots):
    """Quantized version of timm's ``EvaAttention`` (EVA-02): fused ``qkv`` (q/v biases folded into
    it) or separate q/k/v projections, optional q/k norms, rotary embeddings applied to q and k
    before they are quantized (timm's public ``apply_rot_embed_cat``), an optional LayerNorm before
    ``proj`` (a LayerNorm -> Linear pair) and an optional gate."""

    def __init__(self, attn: nn.Module, qk: tuple, av: tuple) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.num_prefix_tokens, self.rotate_half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        self.qkv = _qkv_with_bias(attn) if attn.qkv is not None else None
        for name in (
            "q_proj",
            "k_proj",
            "v_proj",
            "q_norm",
            "k_norm",
            "attn_drop",
            "norm",
            "proj",
            "proj_drop",
        ):
            setattr(self, name, getattr(attn, name))
        self.gate = getattr(attn, "gate", None)  # timm < 1.0.28 has no gated EVA attention
        self._init_matmuls(qk, av)

    def value_path(self) -> ValuePath | None:
        if not isinstance(self.norm, nn.Identity) or self.gate is not None:
            return None
        if self.qkv is None:
            return ValuePath(self.v_proj, slice(None), self.proj)
        return _third_of_qkv(self.qkv, self.proj)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        if self.qkv is not None:
            return self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return tuple(
            p(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )

    def _rotate(self, t: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        npt = self.num_prefix_tokens
        rotated = apply_rot_embed_cat(t[:, :, npt:, :], rope, half=self.rotate_half)
        return torch.cat([t[:, :, :npt, :], rotated], dim=2)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self._qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
        x = self._attend(q, k, v, _additive_mask(attn_mask, n, q, is_causal))
        x = self.norm(x.transpose(1, 2).reshape(b, n, -1))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
