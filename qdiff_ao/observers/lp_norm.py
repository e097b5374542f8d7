"""Lp range search (Q-Diffusion / BRECQ "mse" scale method), per tensor and per channel.

The observed range [min, max] is shrunk in steps of 1%: candidate i in 0..79 quantizes to the range
[(1 - 0.01 i) min, (1 - 0.01 i) max]. The candidate kept minimises the Lp reconstruction error

    E_i = sum_x |x - fq_i(x)|^p,   p = 2.4 by default (Q-Diffusion),

which trades clipping error against rounding error. The reference implementation evaluates E_i on the last
calibration batch only and loops over channels in Python. Here E_i is evaluated on a histogram accumulated over
*all* batches (``observers/histogram.py``: exact merging, so the result does not depend on batch order), with bin
centres standing in for the values, vectorised over channels. Bins are fine enough (8192 per tensor, 256-2048 per
channel over at most twice the observed range) that a quantization step spans at least ~8 bins at 8 bits
(per tensor) and ~8 bins at 4 bits (per channel).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from qdiff_ao.observers.histogram import bin_centers, rebin_histogram, update_histogram
from qdiff_ao.observers.minmax import RangeMinMaxObserver
from qdiff_ao.primitives import choose_qparams, fake_quant

__all__ = ["LpObserver", "PerChannelLpObserver"]


class _LpSearchObserver(RangeMinMaxObserver):
    """Shared machinery: exact min/max, mergeable histograms and the vectorised candidate search."""

    hist: torch.Tensor
    bound: torch.Tensor

    def __init__(
        self,
        p: float = 2.4,
        num_candidates: int = 80,
        shrink_step: float = 0.01,
        bins: int = 2048,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not p > 0:
            raise ValueError(f"p must be > 0, got {p}")
        if num_candidates < 1 or not 0 < shrink_step and shrink_step * (num_candidates - 1) < 1:
            raise ValueError(
                f"need num_candidates >= 1 and 0 < shrink_step*(num_candidates-1) < 1, got {num_candidates}, "
                f"{shrink_step}"
            )
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.p = float(p)
        self.num_candidates = int(num_candidates)
        self.shrink_step = float(shrink_step)
        self.bins = int(bins)
        self.register_buffer("hist", torch.zeros(1, self.bins, dtype=torch.float64))
        self.register_buffer("bound", torch.zeros(1, dtype=torch.float64))
        self._cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # search result; reset on data

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return self._channel_view(x) if self.per_channel else x.reshape(1, -1)

    def _observe(self, x: torch.Tensor) -> None:
        self._cached = None
        lo, hi = self._batch_min_max(x)  # per row of ``rows`` below: reused for the histogram's grid
        self._update_min_max(lo, hi)
        rows = self._rows(x)
        if self.hist.shape[0] != rows.shape[0]:
            self.hist = torch.zeros(rows.shape[0], self.bins, dtype=torch.float64, device=x.device)
            self.bound = torch.zeros(rows.shape[0], dtype=torch.float64, device=x.device)
        self.hist, self.bound = update_histogram(self.hist, self.bound, rows, torch.maximum(-lo, hi))

    def search(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the candidate search; returns (best shrink ratio, min, max) per row (1-d tensors).

        The error sums run in float32 on the occupied bins only (the bin counts are exact integers).
        """
        if self._cached is not None:
            return self._cached
        lo = self.min_val.reshape(-1).double()
        hi = self.max_val.reshape(-1).double()
        occupied = (self.hist > 0).any(dim=0)  # bins empty in every row cost nothing in any candidate
        centers = bin_centers(self.bound, self.bins)[:, occupied].float()
        counts = self.hist[:, occupied].float()
        best_err = torch.full(lo.shape, float("inf"), device=lo.device)
        best_ratio = torch.ones_like(lo)
        for i in range(self.num_candidates):
            ratio = 1.0 - self.shrink_step * i
            scale, zp = choose_qparams(lo * ratio, hi * ratio, self.quant_min, self.quant_max, self.symmetric, self.eps)
            fq = fake_quant(centers, scale, zp, self.quant_min, self.quant_max, ch_axis=0)
            err = (counts * (centers - fq).abs_().pow_(self.p)).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
        self._cached = (best_ratio, lo * best_ratio, hi * best_ratio)
        return self._cached

    def _min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not bool(torch.isfinite(self.min_val).all()):
            return self.min_val, self.max_val
        _, lo, hi = self.search()
        shape = self.min_val.shape
        return lo.float().reshape(shape), hi.float().reshape(shape)

    def reset_min_max_vals(self) -> None:
        self._cached = None
        super().reset_min_max_vals()
        self.hist = torch.zeros(1, self.bins, dtype=torch.float64, device=self.hist.device)
        self.bound = torch.zeros(1, dtype=torch.float64, device=self.bound.device)

    def all_reduce_statistics(self, group: Any = None) -> None:
        """Merge over the ranks of ``group``: min/max, then the histograms exactly. The grids agree first (MAX of
        the power-of-two bounds; each rank re-bins by exact bin-pair merging, :func:`rebin_histogram`), then the
        counts are summed: integers held in float64 (exact below 2**53), so the sum is the same in any order and
        equals the histogram one process would hold after seeing every rank's rows."""
        super().all_reduce_statistics(group)
        shapes: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(shapes, tuple(self.hist.shape), group=group)
        rows = max(shape[0] for shape in shapes)
        if tuple(self.hist.shape) != (rows, self.bins):  # a rank that saw no data still has the 1-row placeholder
            self.hist = torch.zeros(rows, self.bins, dtype=torch.float64, device=self.hist.device)
            self.bound = torch.zeros(rows, dtype=torch.float64, device=self.bound.device)
        bound = self.bound.clone()
        dist.all_reduce(bound, op=dist.ReduceOp.MAX, group=group)
        self.hist = rebin_histogram(self.hist, self.bound, torch.where(self.bound > 0, bound, self.bound))
        dist.all_reduce(self.hist, op=dist.ReduceOp.SUM, group=group)
        self.bound = bound
        self._cached = None

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._cached = None
        for name in ("hist", "bound"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"p={self.p}, num_candidates={self.num_candidates}, bins={self.bins}, " + super().extra_repr()


class LpObserver(_LpSearchObserver):
    """Per-tensor Lp range search for activations (default: 8-bit unsigned affine, p = 2.4, 8192 bins).

    Example:
        >>> import torch
        >>> torch.manual_seed(0) is not None
        True
        >>> obs = LpObserver(quant_min=0, quant_max=15)      # 4-bit codes in a quint8 container
        >>> x = torch.randn(10_000)
        >>> _ = obs(x)
        >>> ratio, lo, hi = obs.search()     # at 4 bits the Gaussian tails are worth clipping
        >>> bool(ratio < 1.0), bool(hi < x.max())
        (True, True)
    """

    per_channel_allowed = False

    def __init__(self, bins: int = 8192, **kwargs: Any) -> None:
        super().__init__(bins=bins, **kwargs)


class PerChannelLpObserver(_LpSearchObserver):
    """Per-channel Lp range search for weights (default: 8-bit signed symmetric on ``ch_axis`` 0).

    ``bins=None`` sizes the histograms to the code range: 16 bins per code level, between 256 and 2048
    (4-bit weights: 256 bins per channel, ~8 bins per quantization step).
    """

    per_channel_allowed = True

    def __init__(
        self,
        dtype: torch.dtype = torch.qint8,
        qscheme: torch.qscheme = torch.per_channel_symmetric,
        bins: int | None = None,
        **kwargs: Any,
    ) -> None:
        if qscheme not in (torch.per_channel_affine, torch.per_channel_symmetric):
            raise ValueError(f"PerChannelLpObserver needs a per-channel qscheme, got {qscheme}")
        if bins is None:
            levels = kwargs.get("quant_max", 127) - kwargs.get("quant_min", -128) + 1
            bins = min(2048, max(256, 1 << (16 * levels - 1).bit_length()))
        super().__init__(dtype=dtype, qscheme=qscheme, bins=bins, **kwargs)
