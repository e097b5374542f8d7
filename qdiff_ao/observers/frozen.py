"""An observer with fixed qparams: how learned or loaded qparams reach ``convert_fx``.

Reconstruction learns activation step sizes and weight roundings; checkpoints bring qparams from disk. Putting
a ``FrozenObserver`` where an observer was (activations), or in a module's ``qconfig.weight`` (weights), makes
``convert_fx`` use exactly those qparams: ``calculate_qparams`` returns them, ``forward`` records nothing.
"""

from __future__ import annotations

from typing import Any, cast

import torch

from qdiff_ao._compat import ObserverBase

__all__ = ["FrozenObserver"]


class FrozenObserver(ObserverBase):
    """Returns the given (scale, zero_point); observing data changes nothing.

    Args:
        scale, zero_point: 0-d (per tensor) or 1-d (per channel) tensors.
        dtype, qscheme, quant_min, quant_max, ch_axis: the quantizer these qparams belong to.

    Example:
        >>> import torch
        >>> obs = FrozenObserver(torch.tensor(0.5), torch.tensor(3), quant_min=0, quant_max=255)
        >>> _ = obs(torch.randn(8))
        >>> [float(v) for v in obs.calculate_qparams()]
        [0.5, 3.0]
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self,
        scale: torch.Tensor,
        zero_point: torch.Tensor,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: int = 0,
        quant_max: int = 255,
        ch_axis: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dtype=dtype, is_dynamic=False)
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        zero_point = torch.as_tensor(zero_point).detach().clone().to(torch.int64)
        if scale.shape != zero_point.shape:
            raise ValueError(f"scale shape {tuple(scale.shape)} != zero_point shape {tuple(zero_point.shape)}")
        if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
            raise ValueError("FrozenObserver needs finite scales > 0")
        if not bool(((zero_point >= quant_min) & (zero_point <= quant_max)).all()):
            raise ValueError(f"zero_point outside [{quant_min}, {quant_max}]")
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.qscheme = qscheme
        self.quant_min, self.quant_max, self.ch_axis = int(quant_min), int(quant_max), int(ch_axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        return self.scale.clone(), self.zero_point.clone()

    @classmethod
    def like(cls, observer: ObserverBase, scale: torch.Tensor, zero_point: torch.Tensor) -> FrozenObserver:
        """A frozen observer with ``observer``'s dtype / qscheme / range and the given qparams."""
        # torch.ao observers set these as plain attributes, which nn.Module's stubs type as Tensor | Module
        return cls(
            scale, zero_point, dtype=observer.dtype, qscheme=cast(torch.qscheme, observer.qscheme),
            quant_min=cast(int, observer.quant_min), quant_max=cast(int, observer.quant_max),
            ch_axis=getattr(observer, "ch_axis", 0),
        )

    def reset_min_max_vals(self) -> None:
        """Nothing to reset: the qparams are fixed."""

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, qscheme={self.qscheme}, range=[{self.quant_min}, {self.quant_max}]"
