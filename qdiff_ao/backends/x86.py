"""The default backend: torch.ao's fbgemm / x86 INT8 CPU kernels, Q-Diffusion's full scheme.

Its QConfigMapping and BackendConfig are :func:`qdiff_ao.get_qconfig_mapping` / :func:`qdiff_ao.get_backend_config`
(the same objects a user passes to their own ``prepare_fx``); after ``prepare_fx`` every attention softmax gets its
unsigned output observer, and 16-bit ones are frozen to fixed fake-quant before ``convert_fx`` (no 16-bit kernel).
A graph calibrated on a GPU is moved to the CPU before ``convert_fx`` (:func:`qdiff_ao.capture.devices.move_graph`).
"""

from __future__ import annotations

from torch import fx

from qdiff_ao._compat import BackendConfig, QConfigMapping
from qdiff_ao.backends.base import Backend
from qdiff_ao.capture.devices import module_device, move_graph
from qdiff_ao.config import QuantConfig
from qdiff_ao.passes.softmax_observation import freeze_wide_softmax_observers, observe_softmax
from qdiff_ao.qconfig import get_backend_config, get_qconfig_mapping

__all__ = ["X86Backend"]


class X86Backend(Backend):
    """fbgemm/x86 INT8 kernels on the CPU (W4/W8 weights, 8-bit activations, quantized attention)."""

    name = "x86"

    def qconfig_mapping(self, cfg: QuantConfig, gm: fx.GraphModule) -> QConfigMapping:
        return get_qconfig_mapping(cfg)

    def backend_config(self, cfg: QuantConfig) -> BackendConfig:
        return get_backend_config(cfg)

    def after_prepare(self, prepared: fx.GraphModule, cfg: QuantConfig) -> None:
        observe_softmax(prepared, cfg)

    def before_convert(self, prepared: fx.GraphModule) -> None:
        freeze_wide_softmax_observers(prepared)
        if module_device(prepared).type != "cpu":  # calibrated on a GPU: the kernels run on the CPU
            move_graph(prepared, "cpu")
