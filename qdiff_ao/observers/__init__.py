"""Observers for diffusion UNets: Lp range search, running statistics, softmax, timestep-aware wrappers.

Built-in registry names: ``"minmax"``, ``"ema"``, ``"lp"``, ``"lp_per_channel"``, ``"softmax"``, ``"timestep"``.
"""

from __future__ import annotations

from qdiff_ao.observers.base import QuantRangeObserver
from qdiff_ao.observers.frozen import FrozenObserver
from qdiff_ao.observers.lp_norm import LpObserver, PerChannelLpObserver
from qdiff_ao.observers.minmax import EMAMinMaxObserver, RangeMinMaxObserver
from qdiff_ao.observers.registry import get_observer, list_observers, register_observer, unregister_observer
from qdiff_ao.observers.softmax import SoftmaxObserver
from qdiff_ao.observers.timestep import TimestepAwareObserver
from qdiff_ao.observers.timestep_context import current_timestep, timestep_context

__all__ = [
    "EMAMinMaxObserver",
    "FrozenObserver",
    "LpObserver",
    "PerChannelLpObserver",
    "QuantRangeObserver",
    "RangeMinMaxObserver",
    "SoftmaxObserver",
    "TimestepAwareObserver",
    "current_timestep",
    "get_observer",
    "list_observers",
    "register_observer",
    "timestep_context",
    "unregister_observer",
]

for _name, _cls in (
    ("minmax", RangeMinMaxObserver),
    ("ema", EMAMinMaxObserver),
    ("lp", LpObserver),
    ("lp_per_channel", PerChannelLpObserver),
    ("softmax", SoftmaxObserver),
    ("timestep", TimestepAwareObserver),
):
    register_observer(_name)(_cls)
