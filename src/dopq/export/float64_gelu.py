"""GELU in the float64 graph, where onnxruntime has no float64 ``Erf`` (nor a float64 ``Gelu``, whose
function body is one). :func:`exact_float64_gelu` rewrites every float64 ``Erf`` and exact ``Gelu``
node of an exported graph, found by type (a GELU module of any family, or ``F.gelu`` in a forward):

* a ``Gelu`` read only by an activation quantizer (``Div -> Round -> [Add] -> Clip -> Cast``, the
  usual fc2 input) gives that quantizer's codes by comparing its input ``x`` with the float64
  pre-image of the rounding boundary next to it. The pre-images come from bisection over float64
  numbers on torch's own float64 ``gelu`` and the quantizer's rounding (:func:`boundary_pre_images`),
  so the codes are the float64 simulation's; a float32 GELU only tells which boundary is next (its
  error, about 1e-7 of the value, is far below half a step). Only within a few float64 numbers of a
  pre-image, where torch's float64 ``gelu`` is itself not monotone, can no threshold follow it.
* any other one computes ``erf`` in float64 from elementwise nodes (:func:`float64_erf_nodes`): an odd
  polynomial below 1, ``1 - exp(-a^2) P(a) / Q(a)`` above, within 2 float64 ulps of the true ``erf``.
  It costs about 60 passes over the tensor, most of them float64, where the boundary form costs about
  20, most of them float32 (DeiT-Tiny's float64 graph ran at less than half the speed with it), and
  it matches torch's ``gelu`` to a few ulps rather than to the bit.

The coefficients are weighted least-squares fits refined towards minimax (Lawson), made in 50-digit
arithmetic with mpmath; ``tests/test_export.py`` checks the result densely against ``math.erf``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dopq.export.qdq_placement import constant_values, producers_and_readers

__all__ = ["GELU_ARGMIN", "boundary_pre_images", "exact_float64_gelu", "float64_erf_nodes"]

# erf(z) = z * P(z^2) for |z| < 1 (relative error 7e-18 before rounding)
ERF_SMALL = (
    1.1283791670955126, -0.3761263890318352, 0.11283791670944185, -0.026866170643111403,
    0.005223977606117971, -0.0008548325929291421, 0.00012055293576237933, -1.4924712289756645e-05,
    1.644713142554063e-06, -1.620631268097417e-07, 1.3710975891684555e-08, -7.779460345590552e-10,
)  # fmt: skip
# erfc(a) = exp(-a^2) * P(a - 1) / Q(a - 1) for 1 <= a <= 6 (erf's absolute error 1.3e-18);
# erfc(6) = 2e-17 is below half an ulp of 1, so larger |z| use a = 6
ERFC_P = (
    0.427583576155807, 0.5382684943716012, 0.29940076451610365, 0.0898855054871195,
    0.014488637683371585, 0.0010029995625416921,
)  # fmt: skip
ERFC_Q = (
    1.0, 1.8978289962657582, 1.5518343639268726, 0.7019012398335612, 0.18589193556400363,
    0.027457855969512945, 0.0017777841925392124,
)  # fmt: skip
ERF_SPLIT, ERF_TOP = 1.0, 6.0
GELU_ARGMIN = -0.7517915246935645  # GELU decreases below it and increases above it
_SIGN_OFF = 0x7FFFFFFFFFFFFFFF


class _Nodes:
    """Nodes and float64 constants of one rewrite; ``op`` adds a node and returns its output name."""

    def __init__(self, tag: str) -> None:
        self.tag, self.nodes, self.constants = tag, [], {}

    def const(self, value: Any, dtype: Any = np.float64) -> str:
        name = f"{self.tag}_c{len(self.constants)}"
        self.constants[name] = np.asarray(value, dtype)
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = out or f"{self.tag}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out


def _horner(n: _Nodes, coefficients: tuple[float, ...], v: str) -> str:
    acc = n.const(coefficients[-1])
    for c in reversed(coefficients[:-1]):
        acc = n.op("Add", n.op("Mul", acc, v), n.const(c))
    return acc


def float64_erf_nodes(n: _Nodes, z: str, out: str | None = None) -> str:
    """Add nodes computing ``erf(z)`` of a float64 tensor; returns the output's name. +-inf give +-1,
    NaN gives NaN."""
    a = n.op("Abs", z)
    small = n.op("Mul", z, _horner(n, ERF_SMALL, n.op("Mul", z, z)))
    top = n.op("Min", a, n.const(ERF_TOP))  # NaN stays NaN
    v = n.op("Sub", top, n.const(ERF_SPLIT))
    ratio = n.op("Div", _horner(n, ERFC_P, v), _horner(n, ERFC_Q, v))
    erfc = n.op("Mul", n.op("Exp", n.op("Neg", n.op("Mul", top, top))), ratio)
    large = n.op("Mul", n.op("Sign", z), n.op("Sub", n.const(1.0), erfc))
    return n.op("Where", n.op("Less", a, n.const(ERF_SPLIT)), small, large, out=out)


def _gelu_nodes(n: _Nodes, x: str, out: str) -> None:
    """``x / 2 * (1 + erf(x / sqrt 2))`` in float64, torch's order of operations."""
    erf = float64_erf_nodes(n, n.op("Mul", x, n.const(0.5**0.5)))
    n.op("Mul", n.op("Mul", x, n.const(0.5)), n.op("Add", erf, n.const(1.0)), out=out)


# -- exact codes of a quantizer reading GELU --------------------------------------------------------


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """float64 -> int64 in the order of the numbers (consecutive floats, consecutive integers)."""
    i = x.view(torch.int64)
    return torch.where(i < 0, i ^ _SIGN_OFF, i)


def _unordered(i: torch.Tensor) -> torch.Tensor:
    return torch.where(i < 0, i ^ _SIGN_OFF, i).view(torch.float64)


def _first_true(holds: Any, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The smallest float64 in ``[lo, hi)`` where ``holds`` (false below, true above), elementwise;
    ``hi`` where it holds nowhere there."""
    a, b = _ordered(lo), _ordered(hi)
    while bool((a < b).any()):
        mid = (a >> 1) + (b >> 1) + (a & b & 1)  # no int64 overflow
        ok = holds(_unordered(mid))
        a, b = torch.where((a < b) & ~ok, mid + 1, a), torch.where((a < b) & ok, mid, b)
    return _unordered(a)


def boundary_pre_images(scale: float, k_low: int, k_high: int) -> np.ndarray:
    """Where ``round(gelu(x) / scale)`` (float64, torch's ``gelu``) reaches ``k + 1``, for each ``k``
    of ``k_low..k_high``: row 0, the increasing branch (``x >= GELU_ARGMIN``), the smallest ``x``
    there with a code above ``k``; row 1, the decreasing one, the smallest ``x`` below the argmin
    whose code is ``k`` or less (``GELU_ARGMIN`` where none is, -inf where all are). ``x >= row`` then
    says "code above ``k``" on the increasing branch and its negation on the decreasing one.
    """
    s = torch.tensor(scale, dtype=torch.float64)
    k = torch.arange(k_low, k_high + 1, dtype=torch.float64)
    with torch.no_grad():
        above = lambda x: torch.round(F.gelu(x) / s) >= k + 1  # noqa: E731
        argmin, full = torch.full_like(k, GELU_ARGMIN), torch.ones_like(k)
        top = full * ((k_high + 2) * scale + 10.0)  # gelu(x) ~ x up there: every code reached
        rising = _first_true(above, argmin, top)
        falling = _first_true(lambda x: ~above(x), full * -torch.inf, argmin)  # gelu(-inf) is NaN
    return torch.stack([rising, falling]).numpy()


def _quantizer_after(gelu: Any, readers: dict[str, list[Any]], value: Any) -> tuple[Any, ...] | None:
    """``(its nodes, scale, zero point, low code, top code)`` of the per-tensor float64 activation
    quantizer that alone reads ``gelu``'s output (``Div -> Round -> [Add z] -> Clip -> Cast``); None
    where the graph has another shape there."""

    def only_reader(name: str, op_type: str) -> Any:
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and found[0].op_type == op_type else None

    div = only_reader(gelu.output[0], "Div")
    rnd = div and div.input[0] == gelu.output[0] and only_reader(div.output[0], "Round")
    add = rnd and only_reader(rnd.output[0], "Add")
    clip = rnd and only_reader((add or rnd).output[0], "Clip")
    cast = clip and len(clip.input) == 3 and only_reader(clip.output[0], "Cast")
    if not cast:
        return None
    zero = value(add.input[1]) if add else np.zeros(1)  # no "+ 0" node
    scale, low, top = (value(name) for name in (div.input[1], *clip.input[1:]))
    if any(v is None or v.size != 1 for v in (scale, zero, low, top)):
        return None
    nodes = [node for node in (div, rnd, add, clip, cast) if node]
    return nodes, scale.item(), zero.item(), low.item(), top.item()


def _codes_by_boundary(n: _Nodes, x: str, quantizer: tuple[Any, ...]) -> None:
    """Nodes giving the quantizer's codes ``clip(round(gelu(x) / scale) + z)`` exactly: ``k``, the
    floor of a float32 GELU's ``t = gelu(x) / scale``, plus one where ``x`` lies past boundary ``k``'s
    pre-image. ``t`` may be off by its float32 error, but only near an integer, far from the
    boundaries at ``k + 1/2``: ``k`` then is one off and the comparison still gives the code. The
    integers are exact in float32, which also holds the index: float64 passes are the slow ones."""
    import onnx

    nodes, scale, zero_point, low, top = quantizer
    k_low = int(np.floor(-0.17 / scale)) - 1  # GELU's minimum is -0.16997...
    k_high = max(int(top - zero_point), k_low)  # above it every code clips to the top one
    table = boundary_pre_images(scale, k_low, k_high)
    float32, f32 = onnx.TensorProto.FLOAT, np.float32
    # |x| capped where GELU is -0 below and every code clips above: no inf from Cast or Mul
    cap = max(40.0, 2 * (k_high + 2) * scale)
    capped = n.op("Clip", n.op("Cast", x, to=float32), n.const(-cap, f32), n.const(cap, f32))
    t = n.op("Mul", n.op("Gelu", capped), n.const(1.0 / scale, f32))
    k = n.op("Clip", n.op("Floor", t), n.const(k_low, f32), n.const(k_high, f32))
    falling = n.op("Less", x, n.const(GELU_ARGMIN))
    row = n.op("Mul", n.op("Cast", falling, to=float32), n.const(table.shape[1], f32))
    index_f = n.op("Add", n.op("Add", k, row), n.const(-k_low, f32))
    # a NaN (whose codes the simulation leaves undefined too) casts to the lowest int32: Max keeps
    # it inside the table
    index = n.op("Max", n.op("Cast", index_f, to=onnx.TensorProto.INT32), n.const(0, np.int32))
    pre_image = n.op("Gather", n.const(table.reshape(-1)), index)
    above = n.op("Cast", n.op("Xor", n.op("GreaterOrEqual", x, pre_image), falling), to=float32)
    codes = n.op("Add", n.op("Add", k, above), n.const(zero_point, f32))
    clipped = n.op("Clip", codes, n.const(low, f32), n.const(top, f32))
    n.op("Cast", clipped, out=nodes[-1].output[0], to=nodes[-1].attribute[0].i)


def _inferred_types(onnx: Any, model: Any) -> Any:
    """``model``'s graph after shape inference, which serializes the model: the data of large
    initializers is set aside meanwhile (types need none of it), so a graph beyond protobuf's 2 GiB
    (the float64 form of a model of billions of weights) is inferred too."""
    aside = [(t, t.raw_data) for t in model.graph.initializer if len(t.raw_data) > 2**20]
    for tensor, _ in aside:
        tensor.ClearField("raw_data")
    try:
        return onnx.shape_inference.infer_shapes(model).graph
    finally:
        for tensor, data in aside:
            tensor.raw_data = data


def exact_float64_gelu(model: Any) -> None:
    """Rewrite every float64 ``Erf`` and exact ``Gelu`` node of ``model`` (an ONNX ModelProto) into
    nodes onnxruntime runs in float64 and that give the float64 simulation's codes (module doc)."""
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    typed = _inferred_types(onnx, model)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in [*typed.value_info, *typed.input, *typed.output]}
    dtypes.update({init.name: init.data_type for init in graph.initializer})
    values = constant_values(graph)
    _, readers = producers_and_readers(graph)
    replaced, dropped, constants = {}, set(), {}
    for i, node in enumerate(graph.node):
        exact_gelu = node.op_type == "Gelu" and all(a.s in (b"", b"none") for a in node.attribute)
        float64_erf = node.op_type == "Erf" or exact_gelu  # the tanh Gelu has float64 kernels
        if node.domain or not float64_erf or dtypes.get(node.input[0]) != onnx.TensorProto.DOUBLE:
            continue
        n, x = _Nodes(f"gelu64_{i}"), node.input[0]
        quantizer = _quantizer_after(node, readers, values.get) if exact_gelu else None
        if quantizer:
            _codes_by_boundary(n, x, quantizer)
            dropped |= {id(q) for q in quantizer[0]}
        elif exact_gelu:
            _gelu_nodes(n, x, node.output[0])
        else:
            float64_erf_nodes(n, x, node.output[0])
        replaced[id(node)], constants = n.nodes, constants | n.constants
    if not replaced:
        return
    nodes = [new for node in graph.node if id(node) not in dropped for new in replaced.get(id(node), [node])]
    read = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    nodes = [node for node in nodes if node.op_type != "Constant" or node.output[0] in read]  # the steps
    graph.initializer.extend(numpy_helper.from_array(v, name) for name, v in constants.items())
    del graph.node[:]
    graph.node.extend(nodes)
