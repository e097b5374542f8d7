"""Where a model lives, and moving its inputs there: calibration data stay on CPU, the model may be on a GPU.

A :class:`~qdiff_ao.CalibrationSet` keeps its rows on CPU (it can be far larger than the model), so every stage
that feeds rows to a model moves each batch to the model's device first and brings the outputs it keeps back to
the rows' device, where the comparisons and fits run.

A traced graph also holds the device it was traced on as constants (diffusers writes
``torch.ones(..., device=timesteps.device)``, ``x.to(device)``): :func:`move_graph` moves its tensors *and*
rewrites those constants, which ``Module.to`` alone does not.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> module_device(layer)
    device(type='cpu')
    >>> moved = to_device({"sample": torch.zeros(1, 2), "scale": 0.5}, module_device(layer))
    >>> moved["sample"].device, moved["scale"]
    (device(type='cpu'), 0.5)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

__all__ = ["inputs_device", "module_device", "move_graph", "to_device"]


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter, else of its first buffer; CPU for a module with neither."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def inputs_device(inputs: Mapping[str, Any]) -> torch.device:
    """The device of the first tensor among ``inputs`` (CPU if there is none)."""
    for value in inputs.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def to_device(inputs: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """``inputs`` with every tensor on ``device`` (a no-op for tensors already there; other values unchanged)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def move_graph(gm: fx.GraphModule, device: torch.device | str) -> fx.GraphModule:
    """Move ``gm`` to ``device`` in place: its parameters and buffers, and every ``torch.device`` constant in
    its nodes' arguments (a graph traced on a GPU creates its constants there). Returns ``gm``."""
    target = torch.device(device)

    def retarget(value: Any) -> Any:
        return target if isinstance(value, torch.device) else value

    changed = False
    for node in gm.graph.nodes:
        args, kwargs = fx.node.map_aggregate(node.args, retarget), fx.node.map_aggregate(node.kwargs, retarget)
        if args != node.args or kwargs != node.kwargs:
            node.args, node.kwargs = args, kwargs
            changed = True
    if changed:
        gm.recompile()
    return gm.to(target)
