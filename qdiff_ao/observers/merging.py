"""Merge observer statistics across the ranks of a torch.distributed process group, exactly.

After each rank has observed its share of the calibration rows, :func:`all_reduce_observers` leaves every
rank's observers holding the statistics one process would hold after observing all rows, bit for bit:

* min / max (``RangeMinMaxObserver``, ``SoftmaxObserver``, torch.ao's ``MinMaxObserver`` and
  ``PerChannelMinMaxObserver``): ``all_reduce(MIN / MAX)``, exact in any order;
* Lp histograms (``LpObserver``, ``PerChannelLpObserver``): the grids first agree (``all_reduce(MAX)`` of the
  power-of-two bounds, then each rank re-binds its counts by exact bin-pair merging,
  :func:`~qdiff_ao.observers.histogram.rebin_histogram`), then ``all_reduce(SUM)`` of the counts. Counts are
  integers held in float64 (exact below 2**53), so the sum does not depend on the reduction order, and the
  grid after merging is the one a single process reaches (the smallest power of two above every |x|);
* per-timestep ranges of ``TimestepAwareObserver``: gathered from every rank and combined per timestep with min
  / max, stored in increasing timestep order (a single process stores them in the order it met them; only
  :meth:`~qdiff_ao.observers.TimestepAwareObserver.per_step_ranges`, which sorts, reads them).

Observers whose statistics depend on the order of batches (``EMAMinMaxObserver``, torch.ao's moving-average and
histogram observers) cannot be merged exactly and raise. A user's observer joins by defining
``all_reduce_statistics(group)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from qdiff_ao._compat import MinMaxObserver, ObserverBase, PerChannelMinMaxObserver, PlaceholderObserver
from qdiff_ao.observers.frozen import FrozenObserver
from qdiff_ao.observers.histogram import rebin_histogram
from qdiff_ao.observers.lp_norm import _LpSearchObserver
from qdiff_ao.observers.minmax import EMAMinMaxObserver, RangeMinMaxObserver
from qdiff_ao.observers.timestep import TimestepAwareObserver

__all__ = ["all_reduce_observers"]

# torch.ao's exact-range observers; exact types: their moving-average subclasses depend on batch order
_EXACT_MIN_MAX_TYPES = (MinMaxObserver, PerChannelMinMaxObserver)


def _all_reduce_min_max(obs: Any, group: Any) -> None:
    dist.all_reduce(obs.min_val, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(obs.max_val, op=dist.ReduceOp.MAX, group=group)


def _all_reduce_histogram(obs: _LpSearchObserver, group: Any) -> None:
    shapes: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(shapes, tuple(obs.hist.shape), group=group)
    rows = max(shape[0] for shape in shapes)
    if tuple(obs.hist.shape) != (rows, obs.bins):  # a rank that saw no data still has the 1-row placeholder
        obs.hist = torch.zeros(rows, obs.bins, dtype=torch.float64)
        obs.bound = torch.zeros(rows, dtype=torch.float64)
    bound = obs.bound.clone()
    dist.all_reduce(bound, op=dist.ReduceOp.MAX, group=group)
    obs.hist = rebin_histogram(obs.hist, obs.bound, torch.where(obs.bound > 0, bound, obs.bound))
    dist.all_reduce(obs.hist, op=dist.ReduceOp.SUM, group=group)
    obs.bound = bound
    obs._cached = None


def _all_reduce_steps(obs: TimestepAwareObserver, group: Any) -> None:
    records: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(records, (obs.timesteps.tolist(), obs.step_min.tolist(), obs.step_max.tolist()),
                           group=group)
    merged: dict[float, tuple[float, float]] = {}
    for timesteps, mins, maxs in records:
        for t, lo, hi in zip(timesteps, mins, maxs):
            old = merged.get(t)
            merged[t] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
    order = sorted(merged)
    obs.timesteps = torch.tensor(order, dtype=torch.float64)
    obs.step_min = torch.tensor([merged[t][0] for t in order], dtype=obs.step_min.dtype)
    obs.step_max = torch.tensor([merged[t][1] for t in order], dtype=obs.step_max.dtype)


def _merge_one(obs: nn.Module, group: Any) -> None:
    hook = getattr(obs, "all_reduce_statistics", None)
    if callable(hook):
        hook(group)
    elif isinstance(obs, TimestepAwareObserver):
        _all_reduce_steps(obs, group)  # its base observer is a submodule, merged on its own
    elif isinstance(obs, EMAMinMaxObserver):
        raise TypeError("EMAMinMaxObserver keeps a running average whose value depends on the order of batches, so "
                        "ranks cannot merge it exactly; calibrate with RangeMinMaxObserver or LpObserver under "
                        "torch.distributed, or in one process")
    elif isinstance(obs, _LpSearchObserver):
        _all_reduce_min_max(obs, group)
        _all_reduce_histogram(obs, group)
    elif isinstance(obs, RangeMinMaxObserver) or type(obs) in _EXACT_MIN_MAX_TYPES:
        _all_reduce_min_max(obs, group)
    elif not isinstance(obs, (FrozenObserver, PlaceholderObserver)):
        raise TypeError(f"{type(obs).__name__} has no exact merge across ranks; give it a method "
                        "all_reduce_statistics(group) or calibrate in one process")


def all_reduce_observers(model: nn.Module, group: Any = None) -> int:
    """Merge the statistics of every observer in ``model`` across the ranks of ``group``; returns how many.

    Every rank must call it with the same model structure (observers are visited in module order).

    Raises:
        TypeError: an observer that cannot be merged exactly (see the module docstring).
    """
    observers = [m for m in model.modules() if isinstance(m, ObserverBase)]
    for obs in observers:
        _merge_one(obs, group)
    return len(observers)
