"""Give every attention softmax an unsigned output observer (Q-Diffusion quantizes attention probabilities).

A torch.ao ``QConfig`` uses one activation observer for a pattern's inputs and output, so it cannot express
"float scores in, probabilities quantized at 8/16 bits with zero point 0 out". This pass inserts the observer
on the prepared graph directly:

        scores ── softmax ── matmul(·, V)    ==>    scores ── softmax ── softmax_observer ── matmul(·, V)

``convert_fx`` turns the observer into quantize/dequantize nodes like any other (8 bits: torch.ao may lower
dq -> matmul -> q to ``quantized::matmul``). 16-bit codes have no kernel; :func:`freeze_wide_softmax_observers`
replaces such observers by a fixed fake-quant module before conversion, so the matmul runs in float on exact
16-bit grid values.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.config import QuantConfig
from qdiff_ao.primitives import fake_quant
from qdiff_ao.qconfig import softmax_observer

__all__ = ["observe_softmax", "freeze_wide_softmax_observers", "FixedFakeQuantize"]

_PREFIX = "qdiff_softmax_observer_"


def _is_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.softmax, F.softmax, torch.nn.functional.softmax)
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Softmax)
    return False


def observe_softmax(prepared: fx.GraphModule, cfg: QuantConfig) -> list[str]:
    """Insert a softmax observer after every softmax of ``prepared`` (idempotent); returns the observer names.

    Does nothing when ``cfg.act_bits`` is None or ``cfg.quantize_attention`` is False.
    """
    if cfg.act_bits is None or not cfg.quantize_attention:
        return []
    graph = prepared.graph
    names = []
    for node in list(graph.nodes):
        if not _is_softmax(prepared, node):
            continue
        if any(u.op == "call_module" and str(u.target).startswith(_PREFIX) for u in node.users):
            continue
        name = f"{_PREFIX}{sum(1 for n, _ in prepared.named_children() if n.startswith(_PREFIX))}"
        prepared.add_submodule(name, softmax_observer(cfg)())
        with graph.inserting_after(node):
            obs = graph.call_module(name, (node,))
        node.replace_all_uses_with(obs)
        obs.args = (node,)  # replace_all_uses_with rewired the observer's own input too
        names.append(name)
    if names:
        graph.lint()
        prepared.recompile()
    return names


class FixedFakeQuantize(nn.Module):
    """x -> (clamp(round(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale, frozen qparams."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point.detach().clone().long())
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.scale, self.zero_point, self.quant_min, self.quant_max)

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.3g}, zero_point={int(self.zero_point)}, range=[{self.quant_min}, " \
               f"{self.quant_max}]"


def freeze_wide_softmax_observers(prepared: fx.GraphModule) -> list[str]:
    """Replace softmax observers whose codes do not fit 8 bits by :class:`FixedFakeQuantize` (before convert)."""
    frozen = []
    for name, mod in list(prepared.named_children()):
        # the prefixed children are softmax observers, whose quant_min / quant_max are plain ints
        if name.startswith(_PREFIX) and cast(int, mod.quant_max) > 255:
            scale, zero_point = cast(ObserverBase, mod).calculate_qparams()
            qmin, qmax = cast(int, mod.quant_min), cast(int, mod.quant_max)
            setattr(prepared, name, FixedFakeQuantize(scale, zero_point, qmin, qmax))
            frozen.append(name)
    return frozen
