"""qdiff_ao: post-training quantization of diffusion UNets (Q-Diffusion) on torch.ao FX graph mode.

Public API (see README.md): ``QuantConfig``, ``get_qconfig_mapping``, ``get_backend_config``, the observers in
``qdiff_ao.observers``, ``timestep_context``, and the passes in ``qdiff_ao.passes``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from qdiff_ao import passes, report
from qdiff_ao.calibration import calibrate, collect_calibration_data, select_step_indices
from qdiff_ao.calibration_set import CalibrationSet
from qdiff_ao.checkpoint import CheckpointError, load, save
from qdiff_ao.config import QuantConfig, ReconstructionConfig
from qdiff_ao.lowering import convert, prepare, quantize_fx
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
from qdiff_ao.onnx_export import export_onnx
from qdiff_ao.qconfig import get_backend_config, get_qconfig_mapping
from qdiff_ao.recipe import quantize
from qdiff_ao.tracing import trace
from qdiff_ao.unet import QuantizedUNet

__all__ = [
    "__version__",
    "calibrate",
    "CalibrationSet",
    "CheckpointError",
    "collect_calibration_data",
    "convert",
    "EMAMinMaxObserver",
    "export_onnx",
    "get_backend_config",
    "get_observer",
    "get_qconfig_mapping",
    "load",
    "LpObserver",
    "passes",
    "PerChannelLpObserver",
    "prepare",
    "QuantConfig",
    "quantize",
    "quantize_fx",
    "QuantizedUNet",
    "RangeMinMaxObserver",
    "ReconstructionConfig",
    "register_observer",
    "report",
    "save",
    "select_step_indices",
    "SoftmaxObserver",
    "timestep_context",
    "TimestepAwareObserver",
    "trace",
]
