"""The typed state a traced UNet graph carries through the pipeline: one dataclass under one ``meta`` key.

Every stage reads and extends the same :class:`QDiffGraphInfo`::

    trace ─────────────► trace, module_types
    split_shortcut ────► splits
    prepare_fx ────────► (carried: see below)
    Backend.prepare ───► config, backend
    observe_softmax ───► config, softmax_observers
    reconstruct ───────► reconstruction report
    correct_output_bias► bias_correction report
    plan_cudnn_lowering► cudnn_decisions
    convert_fx ────────► (carried)

torch.fx rebuilds a fresh ``GraphModule`` (with an empty ``meta``) inside ``prepare_fx`` and ``convert_fx``. The
info therefore also lives in the GraphModule attribute :data:`GRAPH_INFO_ATTR`, which torch.ao's own mechanism,
``PrepareCustomConfig`` / ``ConvertCustomConfig.set_preserved_attributes``, copies onto the new module;
:func:`prepare_custom_config` and :func:`convert_custom_config` return configs that do so. ``qdiff_ao.prepare`` /
``convert`` pass them, and so does a user's own ``prepare_fx`` / ``convert_fx`` call that passes them.

Example:
    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    >>> has_graph_info(gm)
    False
    >>> info = QDiffGraphInfo(trace=None, module_types={"": torch.nn.Linear})
    >>> set_graph_info(gm, info)
    >>> update_graph_info(gm, splits=()).splits, graph_info(gm).module_types[""].__name__
    ((), 'Linear')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

from qdiff_ao._compat import ConvertCustomConfig, PrepareCustomConfig
from qdiff_ao.config import QuantConfig

__all__ = [
    "ATTENTION_ROLE",
    "GRAPH_INFO_ATTR",
    "QDiffGraphInfo",
    "TraceInfo",
    "convert_custom_config",
    "graph_info",
    "has_graph_info",
    "prepare_custom_config",
    "set_graph_info",
    "update_graph_info",
]

GRAPH_INFO_ATTR = "qdiff_graph_info"
"""The ``GraphModule.meta`` key and preserved attribute under which the info lives."""

ATTENTION_ROLE = "qdiff_attention"
"""``node.meta`` key of decomposed attention nodes: "qk", "scores", "softmax" or "pv"."""

InputSignature = tuple[int, torch.dtype, tuple[int, ...]]  # (ndim, dtype, shape without the batch dim)


@dataclass(frozen=True)
class TraceInfo:
    """What :func:`qdiff_ao.trace` froze: the graph's inputs and the traced model.

    Attributes:
        input_names: graph inputs in forward order.
        inputs: ``{name: (ndim, dtype, shape without the batch dim)}`` of each input.
        model_class: class name of the traced diffusers model.
        decompose_attention: attention traced as matmul/softmax/matmul (True) or one SDPA call.
        num_decomposed_attention: attention calls decomposed.
        frozen_kwargs: forward arguments fixed at trace time (not graph inputs).
        example_batch_size: batch size of the example inputs (None for 0-d inputs only).
    """

    input_names: tuple[str, ...]
    inputs: Mapping[str, InputSignature]
    model_class: str
    decompose_attention: bool
    num_decomposed_attention: int
    frozen_kwargs: Mapping[str, Any]
    example_batch_size: int | None


@dataclass(frozen=True)
class QDiffGraphInfo:
    """Everything qdiff_ao knows about a graph beyond its nodes; each pass returns an updated copy.

    Attributes:
        trace: the trace record (None for a graph qdiff_ao did not trace).
        module_types: ``{qualified module name: class}`` of the traced model (reconstruction finds blocks by it).
        splits: split shortcut records (``SplitRecord``); None when the pass has not run.
        config: the QuantConfig the graph was prepared for.
        backend: the ``qdiff_ao.backends`` object that prepared it (None on the raw torch.ao path).
        softmax_observers: names of the observers ``passes.observe_softmax`` inserted after softmax nodes.
        reconstruction: the report of ``passes.reconstruct``.
        bias_correction: the report of ``passes.correct_output_bias``.
        cudnn_decisions: per-layer cuDNN lowering decisions (``LayerDecision``) of the cuDNN backend.
        timestep_groups: per-timestep-group activation grids
            (``qdiff_ao.quantizers.timestep_grids.TimestepGroupGrids``) of ``passes.choose_timestep_groups``; after
            ``qdiff_ao.convert`` also their lowered qparam entries.
        prediction_spread: the report of ``passes.match_prediction_spread``.
        float_tail: the last timesteps that run with float activations
            (``qdiff_ao.quantizers.float_tail.FloatTail``, from ``passes.choose_float_tail``); None: none.
    """

    trace: TraceInfo | None
    module_types: Mapping[str, type] = dataclasses.field(default_factory=dict)
    splits: tuple[Any, ...] | None = None
    config: QuantConfig | None = None
    backend: Any = None
    softmax_observers: tuple[str, ...] = ()
    reconstruction: Mapping[str, Any] | None = None
    bias_correction: Mapping[str, Any] | None = None
    cudnn_decisions: tuple[Any, ...] | None = None
    timestep_groups: Any = None
    prediction_spread: Mapping[str, Any] | None = None
    float_tail: Any = None


def has_graph_info(gm: fx.GraphModule) -> bool:
    """True if ``gm`` carries a :class:`QDiffGraphInfo` (in ``meta`` or as the preserved attribute)."""
    return _lookup(gm) is not None


def _lookup(gm: fx.GraphModule) -> QDiffGraphInfo | None:
    info = gm.meta.get(GRAPH_INFO_ATTR) if isinstance(getattr(gm, "meta", None), dict) else None
    if info is None:
        info = getattr(gm, GRAPH_INFO_ATTR, None)
    return info if isinstance(info, QDiffGraphInfo) else None


def graph_info(gm: fx.GraphModule) -> QDiffGraphInfo:
    """The graph's :class:`QDiffGraphInfo`.

    Raises:
        ValueError: ``gm`` carries none: it was not made by ``qdiff_ao.trace``, or a ``prepare_fx`` /
            ``convert_fx`` call dropped it (pass ``prepare_custom_config()`` / ``convert_custom_config()``).
    """
    info = _lookup(gm)
    if info is None:
        raise ValueError(
            f"this {type(gm).__name__} carries no qdiff_ao graph info: trace the model with qdiff_ao.trace, and "
            "pass prepare_custom_config=qdiff_ao.prepare_custom_config() to prepare_fx and "
            "convert_custom_config=qdiff_ao.convert_custom_config() to convert_fx (or use qdiff_ao.prepare / "
            "qdiff_ao.convert, which do)"
        )
    return info


def set_graph_info(gm: fx.GraphModule, info: QDiffGraphInfo) -> None:
    """Attach ``info`` to ``gm`` (``meta`` and the preserved attribute)."""
    if not isinstance(info, QDiffGraphInfo):
        raise TypeError(f"info must be a QDiffGraphInfo, got {type(info).__name__}")
    gm.meta[GRAPH_INFO_ATTR] = info
    # a plain attribute (not a module or tensor): torch.ao's preserved-attribute copy carries it
    object.__setattr__(gm, GRAPH_INFO_ATTR, info)
    # GraphModule.__deepcopy__ restores preserved attributes from this record: keep it current too
    preserved = gm.meta.get(_USER_PRESERVED_ATTRIBUTES_KEY)
    if isinstance(preserved, dict) and GRAPH_INFO_ATTR in preserved:
        preserved[GRAPH_INFO_ATTR] = info


def update_graph_info(gm: fx.GraphModule, **changes: Any) -> QDiffGraphInfo:
    """Replace fields of ``gm``'s info (``dataclasses.replace``) and return the new info.

    A graph without info gets a fresh one (``trace=None``) so that passes also run on graphs traced otherwise.
    """
    current = _lookup(gm) or QDiffGraphInfo(trace=None)
    info = dataclasses.replace(current, **changes)
    set_graph_info(gm, info)
    return info


def prepare_custom_config() -> PrepareCustomConfig:
    """A ``PrepareCustomConfig`` that makes ``prepare_fx`` carry the graph info onto the observed graph."""
    return PrepareCustomConfig().set_preserved_attributes([GRAPH_INFO_ATTR])


def convert_custom_config() -> ConvertCustomConfig:
    """A ``ConvertCustomConfig`` that makes ``convert_fx`` carry the graph info onto the converted graph."""
    return ConvertCustomConfig().set_preserved_attributes([GRAPH_INFO_ATTR])
