"""qdiff_ao: post-training quantization of diffusion UNets (Q-Diffusion) on torch.ao FX graph mode.

Public API (see README.md): ``QuantConfig``, ``get_qconfig_mapping``, ``get_backend_config``, the observers in
``qdiff_ao.observers``, ``timestep_context``, and the passes in ``qdiff_ao.passes``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from qdiff_ao.config import QuantConfig, ReconstructionConfig
from qdiff_ao.observers import (
    EMAMinMaxObserver,
    LpObserver,
    PerChannelLpObserver,
    RangeMinMaxObserver,
    SoftmaxObserver,
    TimestepAwareObserver,
    get_observer,
    register_observer,
    timestep_context,
)
from qdiff_ao.qconfig import get_backend_config, get_qconfig_mapping

__all__ = [
    "EMAMinMaxObserver",
    "LpObserver",
    "PerChannelLpObserver",
    "QuantConfig",
    "RangeMinMaxObserver",
    "ReconstructionConfig",
    "SoftmaxObserver",
    "TimestepAwareObserver",
    "__version__",
    "get_backend_config",
    "get_observer",
    "get_qconfig_mapping",
    "register_observer",
    "timestep_context",
]
