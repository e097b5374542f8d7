"""The cuDNN backend: torch's QuantizedCUDA INT8 conv / linear kernels, for the layers that qualify.

Before ``prepare_fx`` it plans the lowering layer by layer (:func:`~qdiff_ao.backends.cudnn_rules.plan_cudnn_lowering`,
recorded as ``graph_info(gm).cudnn_decisions``); layers that break a kernel rule get qconfig None and stay float.
Activations are symmetric qint8 (zero point 0), weights per-tensor symmetric qint8; no softmax observation (the
attention matmuls are not cuDNN kernels). Build, calibrate and convert with the model and data on the CUDA
device: ``convert_fx`` packs weights for the device they are on. Run once on an H200 (README, "GPU"): convs
match torch.ao's reference within 0.3% relative L2; linears with a bias stay float (the kernel drops it, measured).

Example:
    >>> import torch, qdiff_ao
    >>> from qdiff_ao.backends import CudnnBackend
    >>> cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, weight_granularity="per_tensor", act_symmetric=True,
    ...                            timestep_aware=False)
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=2)).eval()
    >>> prepared = qdiff_ao.prepare(net, cfg, {"input": torch.randn(1, 3, 8, 8)}, backend=CudnnBackend())
    >>> [(d.name, d.use_cudnn) for d in qdiff_ao.graph_info(prepared).cudnn_decisions]
    [('0', True), ('1', False)]
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
from torch import fx, nn

from qdiff_ao._compat import BackendConfig, DTypeConfig, QConfig, QConfigMapping
from qdiff_ao.backends.base import Backend
from qdiff_ao.backends.cudnn_rules import plan_cudnn_lowering
from qdiff_ao.capture.graph_state import graph_info, has_graph_info, update_graph_info
from qdiff_ao.config import QuantConfig
from qdiff_ao.primitives import qrange
from qdiff_ao.qconfig import activation_observer, get_backend_config, weight_observer

__all__ = ["CudnnBackend"]


def _cudnn_qconfig(cfg: QuantConfig) -> QConfig:
    """qconfig.py's observers, retargeted to signed qint8 with zero point 0 (Conv.cpp / Linear.cpp numerics)."""
    wrong = [f"{name}={getattr(cfg, name)!r} (need {need})" for name, ok, need in (
        ("act_bits", cfg.act_bits is not None, "4..8"),
        ("act_symmetric", cfg.act_symmetric, "True: zero point 0"),
        ("weight_granularity", cfg.weight_granularity == "per_tensor", "'per_tensor'"),
    ) if not ok]
    if wrong:
        raise ValueError(f"cuDNN INT8 kernels need symmetric int8 activations and per-tensor weights; got "
                         f"{', '.join(wrong)}. Build the QuantConfig with those values")
    assert cfg.act_bits is not None  # checked above; narrows the type
    # reduce_range works around an int16 accumulation limit of the x86 kernels; one static scale per layer
    base = dataclasses.replace(cfg, reduce_range="none", timestep_aware=False)
    act_min, act_max = qrange(cfg.act_bits, signed=True)
    act = cast(Any, activation_observer(base)).with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                                                          quant_min=act_min, quant_max=act_max)
    return QConfig(activation=act, weight=weight_observer(base))


class CudnnBackend(Backend):
    """torch's cuDNN INT8 kernels (QuantizedCUDA): symmetric int8 activations, per-tensor int8 weights."""

    name = "cudnn"

    def plan(self, gm: fx.GraphModule, cfg: QuantConfig) -> None:
        _cudnn_qconfig(cfg)  # refuse an unsupported config before planning
        update_graph_info(gm, cudnn_decisions=tuple(plan_cudnn_lowering(gm, cfg)))

    def qconfig_mapping(self, cfg: QuantConfig, gm: fx.GraphModule) -> QConfigMapping:
        """Symmetric qint8 activations and per-tensor symmetric weights; layers planned to stay float get None.

        The observers are qdiff_ao.qconfig's (range method, running statistics, registry overrides), with 8-bit
        weights on the full [-128, 127] range and without ``timestep_aware`` (one static activation scale).

        Raises:
            ValueError: if ``cfg`` asks for weights-only, affine activations or per-channel weights.
        """
        mapping = QConfigMapping().set_global(_cudnn_qconfig(cfg))
        decisions = graph_info(gm).cudnn_decisions if has_graph_info(gm) else None
        for d in decisions or ():
            if not d.use_cudnn and d.op != "add":
                mapping.set_module_name(d.name, None)
        return mapping

    def backend_config(self, cfg: QuantConfig) -> BackendConfig:
        """qdiff_ao.qconfig's Conv2d and Linear patterns with qint8 input, output and weight and float bias (the
        dtypes of cudnn/Conv.cpp and Linear.cpp); codes narrower than 8 bits live in int8."""
        int8 = DTypeConfig(input_dtype=torch.qint8, output_dtype=torch.qint8, weight_dtype=torch.qint8,
                           bias_dtype=torch.float)
        config = BackendConfig("qdiff_ao_cudnn")
        for pattern in get_backend_config(cfg).configs:
            if pattern.pattern in (nn.Conv2d, nn.Linear):
                config.set_backend_pattern_config(pattern.set_dtype_configs([int8]))
        return config
