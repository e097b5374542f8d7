"""Cast integer inputs of float-valued math ops to float before ONNX export.

torch promotes an integer tensor to the default float dtype inside ``log`` / ``exp`` / ``sin`` / ... (diffusers'
Fourier time embedding takes ``torch.log(timesteps)`` of int64 timesteps), but the TorchScript ONNX exporter
writes the op with the integer input as it is: ``Log(int64)`` is an invalid ONNX graph (ONNX Runtime refuses it)
and OpenVINO evaluates it in integers (a silently wrong time embedding). Making torch's promotion explicit,

    y = log(t)          ==>      y = log(t.to(y.dtype))         (only where t is an integer tensor)

changes no value in torch and gives the exporter a float input. The dtypes come from one run of the graph on the
example inputs (``torch.fx.passes.shape_prop``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

__all__ = ["cast_integer_math_inputs"]

_FLOAT_MATH = {torch.log, torch.log2, torch.log10, torch.log1p, torch.exp, torch.expm1, torch.sin, torch.cos,
               torch.tan, torch.sqrt, torch.rsqrt, torch.sigmoid, torch.tanh, torch.erf}
_FLOAT_MATH_METHODS = {f.__name__ for f in _FLOAT_MATH}


def _dtype(node: object) -> torch.dtype | None:
    meta = getattr(node, "meta", {}).get("tensor_meta")
    return getattr(meta, "dtype", None)


def cast_integer_math_inputs(gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> int:
    """Insert ``.to(float dtype)`` before each float-valued math op whose input is an integer tensor (in place).

    Returns:
        How many casts were inserted.
    """
    names = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        ShapeProp(gm).propagate(*(example_inputs[n] for n in names))
    inserted = 0
    for node in list(gm.graph.nodes):
        is_math = (node.op == "call_function" and node.target in _FLOAT_MATH) or (
            node.op == "call_method" and node.target in _FLOAT_MATH_METHODS)
        if not is_math or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        src, out_dtype = node.args[0], _dtype(node)
        src_dtype = _dtype(src)
        if src_dtype is None or out_dtype is None or src_dtype.is_floating_point or src_dtype.is_complex:
            continue
        with gm.graph.inserting_before(node):
            cast = gm.graph.call_method("to", (src, out_dtype))
        node.replace_input_with(src, cast)
        inserted += 1
    if inserted:
        gm.graph.lint()
        gm.recompile()
    return inserted
