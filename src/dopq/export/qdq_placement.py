"""Where activation Q/DQ pairs sit in the openvino form: next to the layer OpenVINO fuses them into.

dopq quantizes an activation where a layer reads it, so the exported ``QuantizeLinear ->
DequantizeLinear`` pair comes after any ``Reshape`` / ``Transpose`` between the producer and the
reader (Swin's window partition before qkv, the heads' merge before an attention's output
projection, the heads' split after qkv). OpenVINO then keeps it as a stand-alone ``FakeQuantize``
layer instead of fusing it into the producer, an extra pass over the activation. A per-tensor
quantizer commutes with any rearrangement of the elements, so moving the pair above them computes
the same values (exact); OpenVINO then fuses it into the layer before (a LayerNorm, an attention
product, a Linear's output), as it does with NNCF's models:

* :func:`hoist_qdq` moves a pair that feeds Linear layers above the rearrangements before it. A
  pair whose rearrangements start at a ``Concat`` (Swin's shifted-window roll) stays: moved there,
  OpenVINO ran those Linears on float kernels (docs/export.md).
* :func:`merge_split_qdq` replaces identical pairs on every output of a ``Split`` (an attention's q,
  k and v once they share a scale, :mod:`dopq.export.qkv_scale`) by one pair before the ``Split``,
  and moves it above the rearrangements before that.
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Any

import numpy as np

__all__ = ["REARRANGEMENTS", "constant_values", "hoist_qdq", "merge_split_qdq", "producers_and_readers"]

# element rearrangements a per-tensor quantizer commutes with
REARRANGEMENTS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
_WEIGHT_PATH = frozenset({"DequantizeLinear", "Sub", "Cast", "Transpose", "Reshape"})


def constant_values(graph: Any) -> dict[str, np.ndarray]:
    """The value of every initializer and ``Constant`` node output of ``graph``, by name."""
    from onnx import numpy_helper

    found = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return found


def _is_constant(name: str, producer: dict[str, Any], constants: dict[str, np.ndarray]) -> bool:
    """True when ``name`` is computed from constants only, through the ops a weight path uses."""
    while name not in constants:
        node = producer.get(name)
        if node is None or node.op_type not in _WEIGHT_PATH:
            return False
        if not all(_is_constant(i, producer, constants) for i in node.input[1:] if i):
            return False
        name = node.input[0]
    return True


def _feeds_linears(dq: Any, readers: dict[str, list], producer: dict[str, Any], constants: dict) -> bool:
    """Every reader of the pair's output is a MatMul / Gemm whose other operand is a constant weight."""
    users = readers[dq.output[0]]
    return bool(users) and all(
        u.op_type in ("MatMul", "Gemm")
        and u.input[0] == dq.output[0]
        and _is_constant(u.input[1], producer, constants)
        for u in users
    )


def _per_tensor(q: Any, constants: dict[str, np.ndarray]) -> bool:
    params = [name for name in q.input[1:3] if name]
    return all(name in constants and constants[name].size == 1 for name in params)


def _movable_pair(q: Any, producer: dict, readers: dict, constants: dict) -> tuple[Any, Any] | None:
    """``(rearrangement, dq)`` when ``q``'s pair can move above the rearrangement producing its input."""
    if q.op_type != "QuantizeLinear" or not _per_tensor(q, constants):
        return None
    before = producer.get(q.input[0])
    if before is None or before.op_type not in REARRANGEMENTS:
        return None
    # other readers of the rearranged tensor may only ask for its shape (they still get it)
    if any(r is not q and r.op_type != "Shape" for r in readers[before.output[0]]):
        return None
    top = before
    while top is not None and top.op_type in REARRANGEMENTS | {"Pad"}:
        top = producer.get(top.input[0])
    if top is not None and top.op_type == "Concat":  # OpenVINO then loses the Linear's integer path
        return None
    dqs = readers[q.output[0]]
    if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
        return None
    return before, dqs[0]


def _topological(graph: Any) -> None:
    """Reorder the nodes so that each comes after the producers of its inputs, otherwise keeping the
    exporter's order (Kahn's algorithm, earliest original position first)."""
    nodes = list(graph.node)
    producer = {out: i for i, node in enumerate(nodes) for out in node.output}
    dependents: dict[int, list[int]] = defaultdict(list)
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for j in {producer[name] for name in node.input if name in producer}:
            dependents[j].append(i)
            waiting[i] += 1
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    ordered = []
    while ready:
        i = heapq.heappop(ready)
        ordered.append(nodes[i])
        for k in dependents[i]:
            waiting[k] -= 1
            if waiting[k] == 0:
                heapq.heappush(ready, k)
    if len(ordered) < len(nodes):
        raise RuntimeError("Q/DQ placement left a cycle in the graph")
    del graph.node[:]
    graph.node.extend(ordered)


def _move_above(before: Any, q: Any, dq: Any, producer: dict, readers: dict) -> None:
    """``x -> before -> Q -> DQ -> users`` becomes ``x -> Q -> DQ -> before -> users``, keeping the
    ``producer`` / ``readers`` maps of the graph up to date."""
    source, rearranged, dequantized = before.input[0], before.output[0], dq.output[0]
    users = readers.pop(dequantized)
    for user in users:
        user.input[:] = [rearranged if name == dequantized else name for name in user.input]
    readers[rearranged] = [r for r in readers[rearranged] if r is not q] + users
    q.input[0] = source
    readers[source] = [q if r is before else r for r in readers[source]]
    moved = f"{dequantized}_before_{before.op_type.lower()}"
    dq.output[0] = before.input[0] = moved
    del producer[dequantized]
    producer[moved] = dq
    readers[moved] = [before]


def producers_and_readers(graph: Any) -> tuple[dict[str, Any], dict[str, list]]:
    """For each tensor name of ``graph``, the node that writes it and the nodes that read it."""
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    return producer, readers


def _hoist(q: Any, producer: dict, readers: dict, constants: dict) -> int:
    """Move ``q``'s pair above every rearrangement it can pass; returns how many."""
    moves = 0
    found = _movable_pair(q, producer, readers, constants)
    while found is not None:
        before, dq = found
        _move_above(before, q, dq, producer, readers)
        moves += 1
        found = _movable_pair(q, producer, readers, constants)
    return moves


def _changed(graph: Any) -> None:
    _topological(graph)
    del graph.value_info[:]  # shapes of the moved tensors changed; runtimes infer them again


def hoist_qdq(model: Any) -> int:
    """Move every per-tensor Q/DQ pair that feeds Linear layers above the rearrangements before it,
    in place; returns how many single moves were made."""
    graph = model.graph
    constants = constant_values(graph)
    producer, readers = producers_and_readers(graph)
    moves = 0
    for q in [node for node in graph.node if node.op_type == "QuantizeLinear"]:
        found = _movable_pair(q, producer, readers, constants)
        if found is not None and _feeds_linears(found[1], readers, producer, constants):
            moves += _hoist(q, producer, readers, constants)
    if moves:
        _changed(graph)
    return moves


def _pair_below(name: str, readers: dict, constants: dict) -> tuple[Any, Any] | None:
    """The per-tensor Q/DQ pair that tensor ``name`` reaches through rearrangements alone (whose
    other readers only ask for its shape), or None."""
    while True:
        users = [r for r in readers[name] if r.op_type != "Shape"]
        if len(users) != 1 or users[0].input[0] != name:
            return None
        node = users[0]
        if node.op_type == "QuantizeLinear":
            dqs = readers[node.output[0]]
            if len(dqs) == 1 and dqs[0].op_type == "DequantizeLinear" and _per_tensor(node, constants):
                return node, dqs[0]
            return None
        if node.op_type not in REARRANGEMENTS:
            return None
        name = node.output[0]


def _grid(pair: tuple[Any, Any], constants: dict) -> tuple | None:
    """The pair's scales and zero points (values and types), or None where one is not a constant."""
    names = [*pair[0].input[1:], "|", *pair[1].input[1:]]
    if any(n not in constants for n in names if n not in ("", "|")):
        return None
    return tuple(
        n if n in ("", "|") else (constants[n].dtype.str, tuple(constants[n].ravel().tolist())) for n in names
    )


def _merge_at(split: Any, pairs: list, producer: dict, readers: dict) -> list:
    """``x -> Split -> Q_i -> DQ_i -> users_i`` (each pair already moved up to the Split) becomes
    ``x -> Q_0 -> DQ_0 -> Split -> users_i``; returns the pairs left without a use."""
    for out, (_, dq) in zip(split.output, pairs, strict=True):
        users = readers.pop(dq.output[0])
        for user in users:
            user.input[:] = [out if name == dq.output[0] else name for name in user.input]
        readers[out] = users
    q, dq = pairs[0]
    source = split.input[0]
    readers[source] = [q if r is split else r for r in readers[source]]
    q.input[0] = source
    split.input[0] = dq.output[0]
    readers[dq.output[0]] = [split]
    for other_q, other_dq in pairs[1:]:
        del producer[other_q.output[0]], producer[other_dq.output[0]]
    return [node for pair in pairs[1:] for node in pair]


def _as_uint8(pair: tuple[Any, Any], graph: Any, constants: dict) -> None:
    """An int8 pair as the same codes in uint8, zero point + 128. onnxruntime (1.32) cannot run an
    int8 pair with a ``Transpose`` after it: its QDQ propagation rebuilds the pair with a zero point
    of the wrong type (the model fails to load); uint8 with zero point 128 it runs, and OpenVINO
    takes it as int8 all the same."""
    from onnx import numpy_helper

    for node in pair:
        zero_point = node.input[2] if len(node.input) > 2 else ""
        if zero_point and constants[zero_point].dtype == np.int8:
            name = f"{node.output[0]}_zero_point_uint8"
            shifted = (constants[zero_point].astype(np.int16) + 128).astype(np.uint8)
            graph.initializer.append(numpy_helper.from_array(shifted, name))
            constants[name] = shifted
            node.input[2] = name


def merge_split_qdq(model: Any) -> int:
    """Where every output of a ``Split`` reaches a per-tensor Q/DQ pair through rearrangements only,
    and the pairs are identical, one pair before the ``Split`` replaces them (exact: the same
    quantizer on every part), moved above the rearrangements before it as :func:`hoist_qdq` would
    (int8 codes as uint8, :func:`_as_uint8`); in place, returns how many ``Split`` layers were merged."""
    graph = model.graph
    constants = constant_values(graph)
    producer, readers = producers_and_readers(graph)
    dropped: list = []
    merged = 0
    for split in [node for node in graph.node if node.op_type == "Split"]:
        pairs = [_pair_below(out, readers, constants) for out in split.output]
        if None in pairs or _grid(pairs[0], constants) is None:
            continue
        if any(_grid(pair, constants) != _grid(pairs[0], constants) for pair in pairs[1:]):
            continue
        for q, dq in pairs:
            while producer[q.input[0]] is not split:
                _move_above(producer[q.input[0]], q, dq, producer, readers)
        dropped += _merge_at(split, pairs, producer, readers)
        _as_uint8(pairs[0], graph, constants)
        _hoist(pairs[0][0], producer, readers, constants)
        merged += 1
    if merged:
        kept = [node for node in graph.node if not any(node is d for d in dropped)]
        del graph.node[:]
        graph.node.extend(kept)
        _changed(graph)
    return merged
