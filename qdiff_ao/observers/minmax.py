"""Min/max observers: the plain running range and Q-Diffusion's exponential moving average ("running_stat").

``RangeMinMaxObserver`` keeps the running minimum and maximum, per tensor or per channel:

    min_val = min(min_val, min(x)),  max_val = max(max_val, max(x))

It is batch-order invariant. ``EMAMinMaxObserver`` (Q-Diffusion's ``running_stat`` for activations) keeps

    min_val <- m * min_val + (1 - m) * min(x),   max_val <- m * max_val + (1 - m) * max(x)

with momentum ``m`` (0.95 in Q-Diffusion); the first batch initialises both. It is order dependent by design.
"""

from __future__ import annotations

from typing import Any

import torch

from qdiff_ao.observers.base import QuantRangeObserver
from qdiff_ao.observers.merging import all_reduce_min_max

__all__ = ["RangeMinMaxObserver", "EMAMinMaxObserver"]


class RangeMinMaxObserver(QuantRangeObserver):
    """Running min/max; per channel when ``qscheme`` is a per-channel scheme.

    Example:
        >>> import torch
        >>> obs = RangeMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
        ...                           quant_min=-8, quant_max=7)
        >>> _ = obs(torch.tensor([[-1.0, 0.5], [0.0, 7.0]]))
        >>> [round(float(s), 4) for s in obs.calculate_qparams()[0]]
        [0.125, 1.0]
    """

    per_channel_allowed = True
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _batch_min_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_channel:
            lo, hi = torch.aminmax(self._channel_view(x), dim=1)
            return lo, hi
        lo, hi = torch.aminmax(x)
        return lo, hi

    def _observe(self, x: torch.Tensor) -> None:
        self._update_min_max(*self._batch_min_max(x))

    def _update_min_max(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Widen the running range by one batch's (min, max)."""
        if self.min_val.shape != lo.shape:
            if torch.isfinite(self.min_val).any():
                raise ValueError(
                    f"{type(self).__name__}: channel count changed from {self.min_val.numel()} to {lo.numel()}"
                )
            self.min_val = torch.full_like(lo, float("inf"))
            self.max_val = torch.full_like(hi, float("-inf"))
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def _min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val, self.max_val

    def reset_min_max_vals(self) -> None:
        self.min_val = torch.tensor(float("inf"), device=self.min_val.device)
        self.max_val = torch.tensor(float("-inf"), device=self.max_val.device)

    def all_reduce_statistics(self, group: Any = None) -> None:
        """Merge min/max over the ranks of ``group`` (``all_reduce`` MIN / MAX: exact in any order)."""
        all_reduce_min_max(self, group)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # Per-channel buffers are sized by the first batch; adopt the saved size before loading.
        for name in ("min_val", "max_val"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class EMAMinMaxObserver(RangeMinMaxObserver):
    """Exponential moving average of per-batch min/max (Q-Diffusion ``running_stat``), per tensor.

    Args:
        momentum: weight of the past, in [0, 1).
        **kwargs: see :class:`QuantRangeObserver`.
    """

    per_channel_allowed = False

    def __init__(self, momentum: float = 0.95, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = torch.aminmax(x)
        if not bool(torch.isfinite(self.min_val)):
            self.min_val, self.max_val = lo.clone(), hi.clone()
            return
        m = self.momentum
        self.min_val = m * self.min_val + (1 - m) * lo
        self.max_val = m * self.max_val + (1 - m) * hi

    def all_reduce_statistics(self, group: Any = None) -> None:
        """Refused: the running average depends on the order of batches, so ranks cannot merge it exactly."""
        raise TypeError("EMAMinMaxObserver keeps a running average whose value depends on the order of batches, so "
                        "ranks cannot merge it exactly; calibrate with RangeMinMaxObserver or LpObserver under "
                        "torch.distributed, or in one process")

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, " + super().extra_repr()
