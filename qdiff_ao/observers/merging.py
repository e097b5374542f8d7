"""Merge observer statistics across the ranks of a torch.distributed process group, exactly.

After each rank has observed its share of the calibration rows, :func:`all_reduce_observers` leaves every
rank's observers holding the statistics one process would hold after observing all rows, bit for bit. It is a
dispatcher: each of our observers merges itself (``all_reduce_statistics(group)``, the hook a user's observer
defines to join), torch.ao's exact min/max observers are reduced here, and:

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

import torch.distributed as dist
from torch import nn

from qdiff_ao._compat import MinMaxObserver, ObserverBase, PerChannelMinMaxObserver, PlaceholderObserver
from qdiff_ao.observers.frozen import FrozenObserver

__all__ = ["all_reduce_min_max", "all_reduce_observers"]

# torch.ao's exact-range observers; exact types: their moving-average subclasses depend on batch order
_EXACT_MIN_MAX_TYPES = (MinMaxObserver, PerChannelMinMaxObserver)


def all_reduce_min_max(obs: Any, group: Any = None) -> None:
    """Merge an observer's ``min_val`` / ``max_val`` over the ranks of ``group`` in place.

    ``min_val = min over ranks``, ``max_val = max over ranks`` (``all_reduce`` MIN / MAX): exact in any order.
    """
    dist.all_reduce(obs.min_val, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(obs.max_val, op=dist.ReduceOp.MAX, group=group)


def _merge_one(obs: Any, group: Any) -> None:
    hook = getattr(obs, "all_reduce_statistics", None)
    if callable(hook):
        hook(group)
    elif type(obs) in _EXACT_MIN_MAX_TYPES:
        all_reduce_min_max(obs, group)
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
