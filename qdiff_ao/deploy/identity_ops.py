"""Drop arithmetic that leaves a float tensor unchanged from a lowered UNet: ``x / 1``, ``x * 1``, ``1 * x``.

diffusers divides every ResNet block's residual sum by ``output_scale_factor`` and every attention block's by
``rescale_output_factor``; both are 1.0 in the usual configs (google/ddpm-cifar10-32, Stable Diffusion), and the
trace records them as ``truediv(x, 1.0)``. In the lowered graph each is a full pass over a float activation
between a dequantize and the next quantize (28 of them per forward in the CIFAR config, ~1.5% of a batch-8
forward, README speed). For a floating-point tensor ``x / 1 == x * 1 == x`` holds bit for bit in IEEE 754
(also for ``-0``, ``inf`` and ``NaN``), so removing the node and reading ``x`` instead changes no output.

What decides "float tensor": one run of the graph on example inputs records, per candidate node, the type, dtype
and shape of its input and of its result; only nodes whose input is a non-quantized floating tensor and whose
result has the same dtype and shape are removed (an integer tensor divided by 1 becomes a float tensor, and a
broadcast ``x * ones`` is not an identity). A node next to an in-place op is kept: after the rewrite the
node's users would alias its input, and an in-place op on either would then change the other.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

__all__ = ["without_identity_arithmetic"]

_DIVISIONS = {operator.truediv, torch.div, torch.true_divide}
_PRODUCTS = {operator.mul, torch.mul}


def _is_one(value: Any) -> bool:
    """A Python number equal to 1 (``True`` is an int in Python but not a number here)."""
    return type(value) in (int, float) and value == 1


def _operand(node: fx.Node) -> fx.Node | None:
    """The tensor operand of ``x / 1``, ``x * 1`` or ``1 * x`` (a graph node), else ``None``."""
    if node.op != "call_function" or node.kwargs or len(node.args) != 2:
        return None
    a, b = node.args
    if node.target in _DIVISIONS and isinstance(a, fx.Node) and _is_one(b):
        return a
    if node.target in _PRODUCTS:
        if isinstance(a, fx.Node) and _is_one(b):
            return a
        if isinstance(b, fx.Node) and _is_one(a):
            return b
    return None


def _may_write_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` may modify one of its inputs (``x.add_(y)``, ``F.silu(x, inplace=True)``, a module
    built with ``inplace=True``). Methods and functions are judged by torch's naming convention for in-place
    ops (a trailing underscore): an op is not identified by its name here, only flagged as possibly in place,
    and a false alarm merely keeps a harmless ``x / 1``."""
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_module":
        return getattr(gm.get_submodule(str(node.target)), "inplace", False) is True
    return False


class _Recorder(fx.Interpreter):
    """Runs the graph and notes, for each candidate node, whether it was an identity on a float tensor."""

    def __init__(self, gm: fx.GraphModule, candidates: dict[fx.Node, fx.Node]) -> None:
        super().__init__(gm)
        self.candidates = candidates
        self.identity: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        operand = self.candidates.get(n)
        if operand is not None:
            x = self.env[operand]
            if (isinstance(x, torch.Tensor) and isinstance(result, torch.Tensor) and not x.is_quantized
                    and x.is_floating_point() and result.dtype == x.dtype and result.shape == x.shape):
                self.identity.add(n)
        return result


@torch.no_grad()
def without_identity_arithmetic(gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """A copy of ``gm`` without its ``x / 1``, ``x * 1`` and ``1 * x`` nodes on float tensors (module docstring).

    The copy shares every submodule (packed weights) with ``gm``, which is left unchanged.

    Args:
        gm: a lowered (converted) GraphModule.
        example_inputs: one batch of its inputs by name; the graph runs once on them to learn the operands' dtypes.

    Raises:
        TypeError: ``gm`` is not a GraphModule.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"without_identity_arithmetic needs an fx.GraphModule, got {type(gm).__name__}")
    out = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    candidates = {}
    for node in out.graph.nodes:
        operand = _operand(node)
        if operand is None:
            continue
        neighbours = [*node.users, *operand.users, operand]
        if not any(_may_write_in_place(out, n) for n in neighbours if n is not node):
            candidates[node] = operand
    if not candidates:
        return out
    names = [str(n.target) for n in out.graph.nodes if n.op == "placeholder"]
    missing = [name for name in names if name not in example_inputs]
    if missing:
        raise ValueError(f"example_inputs must hold every graph input {names}; missing {missing}")
    recorder = _Recorder(out, candidates)
    recorder.run(*[example_inputs[name] for name in names])
    for node in list(out.graph.nodes):  # in order: in x / 1 / 1 the second reads x once the first is gone
        if node in recorder.identity:
            operand = _operand(node)
            assert operand is not None
            node.replace_all_uses_with(operand)
            out.graph.erase_node(node)
    out.graph.lint()
    out.recompile()
    return out
