"""Running a lowered UNet's float tail: rows at timesteps ``t <= below`` on the weights-only view.

A converted graph whose info carries a :class:`~qdiff_ao.quantizers.float_tail.FloatTail` runs the tail's rows on
``fake_quant_view(converted, float_activations=True)``: float Conv2d / Linear layers holding the dequantized
integer weights ``W_hat`` (the same numbers the integer kernels multiply), every activation in float. The view is
built on the first tail call (a float copy of the weights lives from then on: 4 bytes per weight) and is run as a
GraphModule on every backend. Other rows run the integer graph; a batch with rows on both sides is split and put
back in order (UNet rows are independent).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx

from qdiff_ao.capture.graph_state import graph_info, has_graph_info
from qdiff_ao.capture.row_parts import run_by_part
from qdiff_ao.deploy.fake_quant_view import fake_quant_view
from qdiff_ao.quantizers.float_tail import FloatTail

__all__ = ["FloatTailDispatch", "float_tail_of"]


def float_tail_of(gm: fx.GraphModule) -> FloatTail | None:
    """The float tail recorded in ``gm``'s graph info (None: none)."""
    tail = graph_info(gm).float_tail if has_graph_info(gm) else None
    return tail if isinstance(tail, FloatTail) else None


class FloatTailDispatch:
    """Sends each row to the weights-only view (timestep in the tail) or to the integer graph (the rest)."""

    def __init__(self, tail: FloatTail, converted: fx.GraphModule) -> None:
        self.tail = tail
        self._converted = converted
        self._view: fx.GraphModule | None = None

    @classmethod
    def of(cls, converted: fx.GraphModule) -> FloatTailDispatch | None:
        """The dispatch of ``converted``'s float tail (None: the graph has none)."""
        tail = float_tail_of(converted)
        return cls(tail, converted) if tail is not None else None

    def view(self) -> fx.GraphModule:
        """The weights-only model of the tail (built once)."""
        if self._view is None:
            self._view = fake_quant_view(self._converted, float_activations=True)
        return self._view

    @torch.no_grad()
    def run(self, inputs: Mapping[str, Any], quantized: Callable[[dict[str, Any]], torch.Tensor]) -> torch.Tensor:
        """The output for ``inputs`` (graph inputs by name, with a 1-d or 0-d ``timestep``)."""
        inside = self.tail.holds(inputs["timestep"]).long()  # run_by_part runs a batch with one label uncut
        return run_by_part(inputs, inside, lambda tail, sub: self.view()(**sub) if tail else quantized(sub))
