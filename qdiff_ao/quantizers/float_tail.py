"""The float tail: the last denoising steps run with every activation in float (weights stay quantized).

Near ``t = 0`` the noise left in ``x_t`` (and in every feature computed from it) is far smaller than the step of an
8-bit grid that must also hold the image: the quantized model cannot see the noise it is asked to remove, and
what it leaves, no later step removes (docs/quality/HISTORY.md: on shapes16-cond at W8A8 the last 3 of 25 steps held the
whole gap to the float samples). The tail is the set of timesteps

    tail = { t : t <= below }

that run the weights-only model: the same integer weights (``W_hat = (W_q - z_w) s_w``), float activations. A
prepared graph carries the record in ``graph_info(prepared).float_tail`` (chosen by
:func:`qdiff_ao.passes.choose_float_tail`); the fake-quant simulation runs tail rows with its activation quantizers
bypassed, and ``QuantizedUNet`` runs them on the weights-only view of the converted graph.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["FloatTail"]


@dataclass(frozen=True)
class FloatTail:
    """Timesteps ``t <= below`` run with float activations.

    Attributes:
        below: the largest timestep of the tail (a boundary half-way between calibration timesteps).
        report: what the choice measured (``passes.choose_float_tail``); empty for a record read from a checkpoint.
    """

    below: float
    report: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        below = self.below
        if not isinstance(below, (int, float)) or isinstance(below, bool) or not math.isfinite(below) or below < 0:
            raise ValueError(f"FloatTail.below must be a finite timestep >= 0, got {below!r}")

    def holds(self, timestep: torch.Tensor) -> torch.Tensor:
        """Whether each timestep (flattened) is in the tail."""
        return timestep.detach().reshape(-1).to(torch.float64) <= float(self.below)

    def to_dict(self) -> dict[str, Any]:
        return {"below": float(self.below)}
