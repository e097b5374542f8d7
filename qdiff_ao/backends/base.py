"""A backend bundles what torch.ao needs to quantize for one target: its QConfigMapping, its BackendConfig, and
the steps before ``prepare_fx`` / after it / before ``convert_fx`` that the target requires (as torchao's
``Quantizer`` does for PT2E)::

    backend.prepare(gm, cfg, example_inputs)        backend.convert(prepared)
      plan (per-layer decisions, optional)            before_convert (e.g. freeze 16-bit softmax observers)
      prepare_fx(qconfig_mapping, backend_config)     convert_fx(backend_config)
      after_prepare (e.g. observe softmax outputs)

Both carry the graph info (``qdiff_ao.capture.graph_state``) through torch.ao with its preserved-attribute
custom configs and record ``config`` and ``backend`` in it. A new target subclasses :class:`Backend`.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping

import torch
from torch import fx, nn

from qdiff_ao._compat import BackendConfig, QConfigMapping, convert_fx, prepare_fx
from qdiff_ao.capture.graph_state import (
    convert_custom_config,
    graph_info,
    has_graph_info,
    prepare_custom_config,
    update_graph_info,
)
from qdiff_ao.config import QuantConfig

__all__ = ["Backend"]


def _check_keep_float(gm: fx.GraphModule, cfg: QuantConfig) -> None:
    """Every name in ``cfg.keep_float`` must be a Conv2d/Linear module that the graph calls."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    layers = {name for name, m in gm.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and name in called}
    unknown = [name for name in cfg.keep_float if name not in layers]
    if unknown:
        raise ValueError(
            f"QuantConfig.keep_float names {unknown}, which are not Conv2d/Linear layers of this graph; use module "
            f"names such as {sorted(layers)[:4]}"
        )


class Backend(abc.ABC):
    """One quantization target (fbgemm/x86 CPU kernels, cuDNN, ...); stateless, shareable."""

    name: str = "backend"

    @abc.abstractmethod
    def qconfig_mapping(self, cfg: QuantConfig, gm: fx.GraphModule) -> QConfigMapping:
        """Which observer each layer of ``gm`` gets for ``cfg`` (None: the layer stays float)."""

    @abc.abstractmethod
    def backend_config(self, cfg: QuantConfig) -> BackendConfig:
        """The patterns and dtypes the target's kernels support, for ``prepare_fx`` and ``convert_fx``."""

    def plan(self, gm: fx.GraphModule, cfg: QuantConfig) -> None:
        """Before ``prepare_fx``: record per-layer decisions in the graph info (nothing by default)."""
        return None  # an optional hook

    def after_prepare(self, prepared: fx.GraphModule, cfg: QuantConfig) -> None:
        """After ``prepare_fx``: observers a QConfig cannot express (nothing by default)."""
        return None  # an optional hook

    def before_convert(self, prepared: fx.GraphModule) -> None:
        """Before ``convert_fx``: freeze what the target's kernels cannot run (nothing by default)."""
        return None  # an optional hook

    def prepare(
        self, gm: fx.GraphModule, cfg: QuantConfig, example_inputs: Mapping[str, torch.Tensor]
    ) -> fx.GraphModule:
        """``prepare_fx`` of a traced (and split) graph for ``cfg``; returns the observed graph."""
        if not isinstance(cfg, QuantConfig):
            raise TypeError(f"cfg must be a qdiff_ao.QuantConfig, got {type(cfg).__name__}")
        _check_keep_float(gm, cfg)
        self.plan(gm, cfg)
        mapping = self.qconfig_mapping(cfg, gm)
        for name in cfg.keep_float:
            mapping.set_module_name(name, None)
        prepared = prepare_fx(gm, mapping, tuple(example_inputs.values()),
                              prepare_custom_config=prepare_custom_config(), backend_config=self.backend_config(cfg))
        update_graph_info(prepared, config=cfg, backend=self)
        self.after_prepare(prepared, cfg)
        return prepared

    def convert(self, prepared: fx.GraphModule) -> fx.GraphModule:
        """``convert_fx`` of a calibrated prepared graph with this backend's config; returns the lowered graph.

        Raises:
            ValueError: the graph carries no QuantConfig (prepare it with :meth:`prepare`).
        """
        cfg = graph_info(prepared).config if has_graph_info(prepared) else None
        if cfg is None:
            raise ValueError(
                "convert needs the QuantConfig the graph was prepared with; prepare it with qdiff_ao.prepare (or "
                "run qdiff_ao.passes.observe_softmax(prepared, cfg) after your own prepare_fx, which records it)"
            )
        self.before_convert(prepared)
        return convert_fx(prepared, convert_custom_config=convert_custom_config(),
                          backend_config=self.backend_config(cfg))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # Backends are stateless: two instances of one class are the same target (a deep-copied graph's info
    # compares equal to the original's).
    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))
