"""qdiff_ao: post-training quantization of diffusion UNets (Q-Diffusion) on torch.ao FX graph mode.

The package is laid out by pipeline stage (docs/DESIGN.md)::

    capture/ ──► calibration/ ──► passes/ (+ quantizers/, observers/) ──► backends/ ──► deploy/      app/ (CLI)
    trace        collect, calibrate  split, softmax, reconstruct, bias     x86, cuDNN      QuantizedUNet,
                                                                                           checkpoint, ONNX

Public API (see README.md): ``quantize`` (one call); ``prepare -> calibrate -> [passes] -> convert``;
``QuantizedUNet.save_pretrained`` / ``from_pretrained`` (``save`` / ``load`` are aliases); the torch.ao plug-in
surface ``get_qconfig_mapping``, ``get_backend_config``, ``prepare_custom_config``, ``convert_custom_config``;
the observers in ``qdiff_ao.observers``; the passes in ``qdiff_ao.passes``; the backends in ``qdiff_ao.backends``.
"""

from __future__ import annotations

__version__ = "0.1.0"

from qdiff_ao import backends, capture, passes
from qdiff_ao.calibration import report
from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.collection import calibrate, collect_calibration_data, select_step_indices
from qdiff_ao.capture.graph_state import convert_custom_config, graph_info, prepare_custom_config
from qdiff_ao.capture.tracing import trace
from qdiff_ao.config import QuantConfig, ReconstructionConfig
from qdiff_ao.deploy.checkpoint import CheckpointError
from qdiff_ao.deploy.onnx.export import export_onnx
from qdiff_ao.deploy.quantized_unet import QuantizedUNet, load, save
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
from qdiff_ao.workflow import convert, prepare, quantize

# diffusers' pipeline loader finds a component's load method by checking the component class against base classes
# it looks up *on the component's library* (here ``qdiff_ao``): exposing diffusers' own ModelMixin under that name
# is what lets ``model_index.json`` say ``"unet": ["qdiff_ao", "QuantizedUNet"]`` (not part of the public API).
from diffusers import ModelMixin  # noqa: E402,F401  isort: skip

__all__ = [
    "__version__",
    "backends",
    "capture",
    "convert_custom_config",
    "graph_info",
    "prepare_custom_config",
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
