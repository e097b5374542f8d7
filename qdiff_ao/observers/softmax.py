"""Unsigned observer for attention probabilities (softmax outputs), at 8 or 16 bits.

Softmax outputs lie in [0, 1] and attention quality depends on the many small probabilities, so the grid starts
at exactly 0 (zero_point = 0) and ends at the largest probability seen (Q-Diffusion, Sec. 4: attention scores are
quantized unsigned, optionally at higher precision):

    scale = max(x) / (2^b - 1),   zero_point = 0,   codes in [0, 2^b - 1]

8-bit codes live in a ``torch.quint8`` container; 16-bit codes in ``torch.qint32`` (fbgemm has no 16-bit
kernels: the lowered graph keeps the matmul that consumes them in float on dequantized values).
"""

from __future__ import annotations

from typing import Any

import torch

from qdiff_ao.observers.minmax import RangeMinMaxObserver
from qdiff_ao.observers.timestep import TimestepAwareObserver
from qdiff_ao.primitives import qrange

__all__ = ["SoftmaxObserver", "is_softmax_observer"]


class SoftmaxObserver(RangeMinMaxObserver):
    """Range [0, max(x)] with zero point 0 and ``bits`` unsigned bits (8 or 16).

    Example:
        >>> import torch
        >>> obs = SoftmaxObserver(bits=8)
        >>> _ = obs(torch.softmax(torch.tensor([[0.0, 1.0, 2.0]]), dim=-1))
        >>> scale, zp = obs.calculate_qparams()
        >>> int(zp), round(float(scale) * 255, 4)
        (0, 0.6652)
    """

    per_channel_allowed = False

    def __init__(self, bits: int = 8, **kwargs: Any) -> None:
        if bits not in (8, 16):
            raise ValueError(f"softmax bits must be 8 or 16, got {bits}")
        quant_min, quant_max = qrange(bits, signed=False)
        kwargs.setdefault("dtype", torch.quint8 if bits == 8 else torch.qint32)
        kwargs.setdefault("quant_min", quant_min)
        kwargs.setdefault("quant_max", quant_max)
        super().__init__(**kwargs)
        if self.symmetric:
            raise ValueError(
                f"SoftmaxObserver has zero_point 0 by construction; use an affine qscheme, got {self.qscheme}"
            )
        if self.quant_min != 0:
            raise ValueError(
                f"SoftmaxObserver is unsigned with zero_point 0: quant_min must be 0, got {self.quant_min}"
            )
        self.bits = bits

    def _observe(self, x: torch.Tensor) -> None:
        if bool((x < 0).any()):
            raise ValueError(
                "SoftmaxObserver observes probabilities (>= 0) but received negative values; attach it to a "
                "softmax output"
            )
        super()._observe(x)

    def _min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        # The grid starts at 0 whatever the smallest probability seen, so zero_point is exactly 0.
        return torch.zeros_like(self.max_val).where(torch.isfinite(self.max_val), self.min_val), self.max_val


def is_softmax_observer(module: torch.nn.Module) -> bool:
    """True for a ``SoftmaxObserver``, possibly wrapped in a ``TimestepAwareObserver`` (the observers
    ``passes.observe_softmax`` inserts)."""
    if isinstance(module, TimestepAwareObserver):
        module = module.base
    return isinstance(module, SoftmaxObserver)
