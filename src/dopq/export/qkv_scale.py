"""One activation scale for an attention's q, k and v in the openvino form.

q, k and v are quantized where the attention's products read them, each per tensor with its own
scale, after the fused ``qkv`` Linear's output has been split into heads: OpenVINO then runs three
stand-alone ``FakeQuantize`` layers per attention and moves the heads around in float. With one
scale for the three, the three Q/DQ pairs become one pair on the Linear's output
(:func:`dopq.export.qdq_placement.merge_split_qdq`), which OpenVINO fuses into the Linear: its output
is int8 and the head rearrangements move int8.

Sharing the scale changes no code. With ``s_v`` the common scale, q's output rows of the Linear
(weight scales, bias) are multiplied by ``s_v / s_q``, so ``round(q' / s_v) = round(q / s_q)``; the
same for k; and the attention's scale, applied after ``q @ k^T``, is multiplied by
``s_q s_k / s_v^2``. v and everything after ``attn @ v`` stay as they are; the attention computes
the same values up to float rounding.
"""

from __future__ import annotations

from torch import nn

from dopq.export.linear import DeployLinear
from dopq.export.matmul import DeployMatMul
from dopq.export.qdq import ActivationQDQ
from dopq.export.symbolic import int8_shift
from dopq.models import QKVPath, qkv_paths

__all__ = ["share_qkv_scale", "share_qkv_scales"]


def _plain_int8(qdq: nn.Module) -> bool:
    """An 8-bit Q/DQ centred on 0 (``z = 128``): its symmetric form is one int8 Q/DQ pair with no
    offset and no ``Clip`` (below 8 bits a ``Clip`` would keep the pairs apart)."""
    return isinstance(qdq, ActivationQDQ) and qdq.bits == 8 and int8_shift(qdq.zero_point, 8) == 0


def share_qkv_scale(attention: nn.Module, producer: DeployLinear, path: QKVPath) -> bool:
    """Give q and k the scale of v in one attention module of a deploy form (module docstring);
    returns False, changing nothing, where the three quantizers differ in more than their scale."""
    qk, av = attention.matmul_qk, attention.matmul_av
    if not (isinstance(qk, DeployMatMul) and isinstance(av, DeployMatMul)):
        return False
    operands = (qk.qdq_a, qk.qdq_b, av.qdq_b)
    if not all(_plain_int8(o) for o in operands) or not isinstance(attention.scale, float):
        return False
    if producer.float64:
        return False
    q_qdq, k_qdq, v_qdq = operands
    s_q, s_k, s_v = q_qdq.scale, k_qdq.scale, v_qdq.scale
    producer.scale_rows(path.q, s_v / s_q)
    producer.scale_rows(path.k, s_v / s_k)
    q_qdq.scale = k_qdq.scale = s_v
    attention.scale = attention.scale * (s_q * s_k) / (s_v * s_v)
    return True


def share_qkv_scales(deploy: nn.Module, model: nn.Module) -> int:
    """:func:`share_qkv_scale` on every attention of ``deploy`` (the openvino deploy form of
    ``model``) with a fused ``qkv`` Linear (:meth:`qkv_path`); returns how many it changed."""
    names = {id(module): name for name, module in model.named_modules()}
    shared = 0
    for name, path in qkv_paths(model).items():
        producer = deploy.get_submodule(names[id(path.producer)])
        if isinstance(producer, DeployLinear):
            shared += share_qkv_scale(deploy.get_submodule(name), producer, path)
    return shared
