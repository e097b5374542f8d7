"""Rewrites and queries on ONNX graphs (needs the optional ``onnx`` package): bias quantization, Q/DQ census.

Bias quantization (the QDQ convention ONNX Runtime fuses into integer kernels):

    DQ(x; s_x) ──┐                          DQ(x; s_x) ──┐
    DQ(W; s_w) ──┼─ Conv/Gemm      ==>      DQ(W; s_w) ──┼─ Conv/Gemm
    b (float) ───┘                 b_q (int32) ─ DQ(s_x * s_w, 0, axis 0) ─┘

    b_q = clamp(round(b / (s_x * s_w)), -2^31, 2^31 - 1)
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

__all__ = ["constant_arrays", "op_counts", "quantize_biases"]

_INT32 = np.iinfo(np.int32)


def constant_arrays(graph: Any) -> dict[str, np.ndarray]:
    """``{tensor name: value}`` for every initializer, Constant node output and Identity of a constant.

    (The TorchScript exporter shares equal initializers between users through Identity nodes.)
    """
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:  # nodes are in topological order
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
        elif node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return values


def op_counts(graph: Any) -> Counter[str]:
    """Number of nodes of each op type."""
    return Counter(node.op_type for node in graph.node)


def _attr(node: Any, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _weight_axis(node: Any) -> int | None:
    """Axis of the weight input that indexes output channels (None: layout we do not rewrite)."""
    if node.op_type == "Conv":
        return 0
    if _attr(node, "transA", 0) != 0:
        return None
    return 0 if _attr(node, "transB", 0) == 1 else 1


def quantize_biases(model: Any) -> int:
    """Give each Conv / Gemm with DQ inputs an int32 DQ bias (scale s_x * s_w, zero point 0), in place.

    Nodes whose input, weight or bias is not of that form (non-constant scales, a float input) are left alone.

    Returns:
        The number of biases rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    consts = constant_arrays(graph)
    producer = {out: node for node in graph.node for out in node.output}
    uses = Counter(name for node in graph.node for name in node.input)
    new_nodes, new_inits, dropped = [], [], set()
    count = 0
    for node in graph.node:
        dq_bias = _bias_dq(node, producer, consts)
        if dq_bias is not None:
            bias_name = node.input[2]
            bias, scale = dq_bias
            codes = np.clip(np.round(bias.astype(np.float64) / scale), _INT32.min, _INT32.max).astype(np.int32)
            stem = f"{node.name or bias_name}_bias"
            new_inits += [
                numpy_helper.from_array(codes, f"{stem}_int32"),
                numpy_helper.from_array(scale.astype(np.float32), f"{stem}_scale"),
                numpy_helper.from_array(np.zeros_like(codes), f"{stem}_zero_point"),
            ]
            new_nodes.append(helper.make_node(
                "DequantizeLinear", [f"{stem}_int32", f"{stem}_scale", f"{stem}_zero_point"], [f"{stem}_dq"],
                name=f"{stem}_DequantizeLinear", axis=0,
            ))
            node.input[2] = f"{stem}_dq"
            uses[bias_name] -= 1
            if uses[bias_name] == 0:
                dropped.add(bias_name)
            count += 1
        new_nodes.append(node)
    kept_inits = [init for init in graph.initializer if init.name not in dropped]
    kept_nodes = [n for n in new_nodes if not (n.op_type == "Constant" and n.output[0] in dropped)]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + new_inits)
    del graph.node[:]
    graph.node.extend(kept_nodes)
    return count


def _bias_dq(
    node: Any, producer: dict[str, Any], consts: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray] | None:
    """(float bias, per-output-channel bias scale s_x * s_w) if ``node`` qualifies, else None."""
    if node.op_type not in ("Conv", "Gemm") or len(node.input) < 3 or not node.input[2]:
        return None
    x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
    if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return None
    bias = consts.get(node.input[2])
    x_scale, w_scale = consts.get(x_dq.input[1]), consts.get(w_dq.input[1])
    if bias is None or x_scale is None or w_scale is None or bias.dtype != np.float32 or bias.ndim != 1:
        return None
    if x_scale.size != 1:
        return None
    axis = _weight_axis(node)
    if w_scale.size > 1 and (axis is None or _attr(w_dq, "axis", 1) != axis or w_scale.size != bias.size):
        return None
    scale = np.float32(x_scale.reshape(())) * np.broadcast_to(w_scale.astype(np.float32).reshape(-1), bias.shape)
    return bias, np.ascontiguousarray(scale, dtype=np.float32)
