"""Shape-only ops of a traced graph: nodes that move or reshape a tensor without changing its values.

Passes that follow a value through the head reshapes and transposes of attention (reconstruction block
boundaries, the quantizer an attention matmul operand reads) share this one definition.
"""

from __future__ import annotations

import torch
from torch import fx

__all__ = ["VIEW_FUNCTIONS", "VIEW_METHODS", "is_view_op"]

VIEW_METHODS = frozenset({"view", "reshape", "transpose", "permute", "contiguous", "flatten", "unflatten", "squeeze",
                          "unsqueeze"})
VIEW_FUNCTIONS = frozenset({torch.reshape, torch.transpose, torch.permute, torch.flatten, torch.squeeze,
                            torch.unsqueeze})


def is_view_op(node: fx.Node) -> bool:
    """True for a ``call_method`` / ``call_function`` node of a shape-only op (its first argument is the source)."""
    return (node.op == "call_method" and node.target in VIEW_METHODS) or (
        node.op == "call_function" and node.target in VIEW_FUNCTIONS
    )
