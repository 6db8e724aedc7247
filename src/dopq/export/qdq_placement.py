"""Where a Linear's input Q/DQ pair sits in the openvino form: before the token rearrangements.

dopq quantizes a Linear's input where the Linear reads it, so the exported ``QuantizeLinear ->
DequantizeLinear`` pair comes after any ``Reshape`` / ``Transpose`` between the producer and the
Linear (Swin's window partition, the heads' merge before an attention's output projection). OpenVINO
then keeps it as a stand-alone ``FakeQuantize`` layer instead of fusing it into the producer, an extra
pass over the activation per Linear. A per-tensor quantizer commutes with any rearrangement of the
elements, so moving the pair above them computes the same values (exact); OpenVINO then fuses it into
the layer before (a LayerNorm, an attention product), as it does with NNCF's models. A pair whose
rearrangements start at a ``Concat`` (Swin's shifted-window roll) stays: moved there, OpenVINO ran
those Linears on float kernels (docs/export.md).
"""

from __future__ import annotations

import heapq
from collections import defaultdict
from typing import Any

import numpy as np

__all__ = ["REARRANGEMENTS", "hoist_linear_input_qdq"]

# element rearrangements a per-tensor quantizer commutes with
REARRANGEMENTS = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten"})
_WEIGHT_PATH = frozenset({"DequantizeLinear", "Sub", "Cast", "Transpose", "Reshape"})


def _constants(graph: Any) -> dict[str, np.ndarray]:
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


def hoist_linear_input_qdq(model: Any) -> int:
    """Move every per-tensor Q/DQ pair that feeds Linear layers above the rearrangements before it,
    in place; returns how many single moves were made."""
    graph = model.graph
    constants = _constants(graph)
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    moves = 0
    for q in [node for node in graph.node if node.op_type == "QuantizeLinear"]:
        found = _movable_pair(q, producer, readers, constants)
        if found is None or not _feeds_linears(found[1], readers, producer, constants):
            continue
        while found is not None:
            before, dq = found
            _move_above(before, q, dq, producer, readers)
            moves += 1
            found = _movable_pair(q, producer, readers, constants)
    if moves:
        _topological(graph)
        del graph.value_info[:]  # shapes of the moved tensors changed; runtimes infer them again
    return moves
