"""A fake quantizer with frozen qparams, per tensor or per channel.

    fq(x) = (clamp(round(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale

It stands in for an observer once its qparams are final and no integer kernel takes its codes: 16-bit softmax
outputs in a converted graph (the matmul then runs in float on exact grid values), and per-channel activation
quantizers in the reconstruction simulation.

Example:
    >>> import torch
    >>> fq = FixedFakeQuantize(torch.tensor(0.5), torch.tensor(0), 0, 3)
    >>> fq(torch.tensor([0.2, 0.3, 9.0, -1.0])).tolist()
    [0.0, 0.5, 1.5, 0.0]
"""

from __future__ import annotations

import torch
from torch import nn

from qdiff_ao.primitives import fake_quant

__all__ = ["FixedFakeQuantize"]


class FixedFakeQuantize(nn.Module):
    """x -> (clamp(round(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale, frozen qparams.

    Args:
        scale, zero_point: 0-d (per tensor) or 1-d along ``ch_axis`` (per channel).
        quant_min, quant_max: the integer code range.
        ch_axis: channel axis of 1-d qparams (None: per tensor).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, ch_axis: int | None = None
    ) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point.detach().clone().long())
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)
        self.ch_axis = ch_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ch_axis is None:
            return fake_quant(x, self.scale, self.zero_point, self.quant_min, self.quant_max)
        return fake_quant(x, self.scale, self.zero_point, self.quant_min, self.quant_max, self.ch_axis)

    def extra_repr(self) -> str:
        where = f"per channel along {self.ch_axis}" if self.ch_axis is not None else (
            f"scale={float(self.scale):.3g}, zero_point={int(self.zero_point)}"
        )
        return f"{where}, range=[{self.quant_min}, {self.quant_max}]"
