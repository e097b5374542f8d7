"""Common base of qdiff_ao's observers: torch.ao's observer contract plus our quantization-range rules.

A quantizer is described the torch.ao way: ``dtype`` (the integer container: ``torch.quint8``, ``torch.qint8``
or ``torch.qint32``), ``qscheme`` (per-tensor / per-channel, affine / symmetric) and the integer code range
``[quant_min, quant_max]``, which may be narrower than the container (4-bit weights live in int8 containers
with range [-8, 7]). Subclasses keep their statistics in buffers and implement ``_observe`` and ``_min_max``
(or override ``calculate_qparams``); qparams come from :func:`qdiff_ao.primitives.choose_qparams`.
"""

from __future__ import annotations

from typing import Any

import torch

from qdiff_ao._compat import ObserverBase
from qdiff_ao.primitives import SCALE_EPS, check_finite, choose_qparams

__all__ = ["QuantRangeObserver", "CONTAINER_RANGES"]

# The integer range each quantized container dtype can hold.
CONTAINER_RANGES: dict[torch.dtype, tuple[int, int]] = {
    torch.quint8: (0, 255),
    torch.qint8: (-128, 127),
    torch.qint32: (-(2**31), 2**31 - 1),
}

_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


class QuantRangeObserver(ObserverBase):
    """Base observer: validated dtype / qscheme / [quant_min, quant_max] and NaN/Inf-checked ``forward``.

    Args:
        dtype: integer container, one of ``torch.quint8``, ``torch.qint8``, ``torch.qint32``.
        qscheme: ``torch.per_tensor_affine``, ``torch.per_tensor_symmetric`` (per-tensor observers) or the
            per-channel schemes (per-channel observers).
        quant_min, quant_max: the code range; defaults to the container's full range.
        ch_axis: channel axis for per-channel schemes (0 for Conv2d / Linear weights).
        eps: smallest scale handed out.

    Raises:
        ValueError: for an unknown dtype or qscheme, or a code range outside the container.
    """

    per_channel_allowed = False

    def __init__(
        self,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: int | None = None,
        quant_max: int | None = None,
        ch_axis: int = 0,
        eps: float = SCALE_EPS,
        is_dynamic: bool = False,
        **kwargs: Any,
    ) -> None:
        if is_dynamic:
            raise ValueError("qdiff_ao observers are for static quantization; got is_dynamic=True")
        if kwargs:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(kwargs)}")
        super().__init__(dtype=dtype, is_dynamic=False)
        if dtype not in CONTAINER_RANGES:
            raise ValueError(
                f"dtype must be one of {list(CONTAINER_RANGES)}, got {dtype}; 4-bit codes use torch.qint8 with "
                "quant_min=-8, quant_max=7"
            )
        allowed = _PER_TENSOR + (_PER_CHANNEL if self.per_channel_allowed else ())
        if qscheme not in allowed:
            raise ValueError(f"{type(self).__name__} supports qscheme in {allowed}, got {qscheme}")
        lo, hi = CONTAINER_RANGES[dtype]
        quant_min = lo if quant_min is None else int(quant_min)
        quant_max = hi if quant_max is None else int(quant_max)
        if not lo <= quant_min < quant_max <= hi:
            raise ValueError(
                f"[quant_min, quant_max] = [{quant_min}, {quant_max}] must be a non-empty range inside the "
                f"{dtype} container [{lo}, {hi}]"
            )
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.qscheme = qscheme
        self.quant_min = quant_min
        self.quant_max = quant_max
        self.ch_axis = ch_axis
        self.eps = float(eps)

    @property
    def symmetric(self) -> bool:
        return self.qscheme in _SYMMETRIC

    @property
    def per_channel(self) -> bool:
        return self.qscheme in _PER_CHANNEL

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record statistics of ``x`` (detached) and return ``x`` unchanged; empty tensors are ignored."""
        if x.numel() == 0:
            return x
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} observes float tensors, got dtype {x.dtype}; integer-valued graph nodes "
                "(e.g. timestep arithmetic) must not be observed"
            )
        xd = x.detach()
        check_finite(xd, type(self).__name__)
        self._observe(xd.float())
        return x

    def _observe(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The range to quantize: (min, max), 0-d per tensor, 1-d per channel."""
        raise NotImplementedError

    def has_data(self) -> bool:
        lo, _ = self._min_max()
        return bool(torch.isfinite(lo).all())

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """(scale, zero_point) from ``choose_qparams`` on the observed range.

        Raises:
            RuntimeError: if the observer has seen no data.
        """
        lo, hi = self._min_max()
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise RuntimeError(
                f"{type(self).__name__} has seen no data: run calibration batches through the prepared model "
                "before convert_fx"
            )
        return choose_qparams(lo, hi, self.quant_min, self.quant_max, self.symmetric, self.eps)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, qscheme={self.qscheme}, quant_min={self.quant_min}, quant_max={self.quant_max}"

    def _channel_view(self, x: torch.Tensor) -> torch.Tensor:
        """x as (C, N): channels on ``ch_axis`` first, everything else flattened."""
        if x.dim() == 0:
            raise ValueError(f"{type(self).__name__} is per-channel and needs a tensor with a channel axis")
        axis = self.ch_axis % x.dim()
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
