"""Give every attention softmax an unsigned output observer (Q-Diffusion quantizes attention probabilities).

A torch.ao ``QConfig`` uses one activation observer for a pattern's inputs and output, so it cannot express
"float scores in, probabilities quantized at 8/16 bits with zero point 0 out". This pass inserts the observer
on the prepared graph directly:

        scores ── softmax ── matmul(·, V)    ==>    scores ── softmax ── softmax_observer ── matmul(·, V)

``convert_fx`` turns the observer into quantize/dequantize nodes like any other (8 bits: torch.ao may lower
dq -> matmul -> q to ``quantized::matmul``). 16-bit codes have no kernel; :func:`freeze_wide_softmax_observers`
replaces such observers by a fixed fake-quant module before conversion, so the matmul runs in float on exact
16-bit grid values.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.capture.devices import module_device
from qdiff_ao.capture.graph_state import graph_info, has_graph_info, update_graph_info
from qdiff_ao.config import QuantConfig
from qdiff_ao.observers.softmax import is_softmax_observer
from qdiff_ao.passes.attention_operands import symmetric_attention_operands
from qdiff_ao.qconfig import softmax_observer
from qdiff_ao.quantizers.fixed import FixedFakeQuantize
from qdiff_ao.quantizers.qparams import activation_qparams

__all__ = ["FixedFakeQuantize", "freeze_wide_softmax_observers", "is_softmax_observer", "observe_softmax"]

_PREFIX = "qdiff_softmax_observer_"


def _is_softmax(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in (torch.softmax, F.softmax, torch.nn.functional.softmax)
    if node.op == "call_method":
        return node.target == "softmax"
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Softmax)
    return False


def observe_softmax(prepared: fx.GraphModule, cfg: QuantConfig) -> fx.GraphModule:
    """Insert a softmax observer after every softmax of ``prepared`` (idempotent); returns ``prepared``.

    The observers' module names are recorded in ``graph_info(prepared).softmax_observers``.

    Also records ``cfg`` as the graph's QuantConfig (``graph_info(prepared).config``): on the raw torch.ao path
    (``prepare_fx`` with ``get_qconfig_mapping(cfg)``) this pass is where the graph learns its config. Inserts
    nothing when ``cfg.act_bits`` is None or ``cfg.quantize_attention`` is False. With
    ``cfg.attention_symmetric=True`` it also gives Q, K and V symmetric observers
    (:func:`~qdiff_ao.passes.attention_operands.symmetric_attention_operands`), so both paths build the same graph.
    """
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a qdiff_ao.QuantConfig, got {type(cfg).__name__}")
    info = update_graph_info(prepared, config=cfg)
    if cfg.act_bits is None or not cfg.quantize_attention:
        return prepared
    graph = prepared.graph
    known = set(info.softmax_observers)
    names = []
    for node in list(graph.nodes):
        if not _is_softmax(prepared, node) or any(u.op == "call_module" and u.target in known for u in node.users):
            continue
        index = 0
        while hasattr(prepared, f"{_PREFIX}{index}"):
            index += 1
        name = f"{_PREFIX}{index}"
        prepared.add_submodule(name, softmax_observer(cfg)().to(module_device(prepared)))
        with graph.inserting_after(node):
            obs = graph.call_module(name, (node,))
        node.replace_all_uses_with(obs)
        obs.args = (node,)  # replace_all_uses_with rewired the observer's own input too
        names.append(name)
    if names:
        graph.lint()
        prepared.recompile()
        update_graph_info(prepared, softmax_observers=(*info.softmax_observers, *names))
    if cfg.attention_symmetric is True:  # the other operands of the attention matmuls: Q, K, V ("measured" grids
        # are chosen after calibration, by passes.choose_attention_grids)
        symmetric_attention_operands(prepared, cfg)
    return prepared


def freeze_wide_softmax_observers(prepared: fx.GraphModule) -> fx.GraphModule:
    """Replace softmax observers whose codes do not fit 8 bits by :class:`FixedFakeQuantize` (before convert).

    Returns ``prepared``; idempotent (a frozen observer is no longer a softmax observer).
    """
    names = graph_info(prepared).softmax_observers if has_graph_info(prepared) else ()
    for name in names:
        mod = prepared.get_submodule(name)
        if is_softmax_observer(mod) and cast(int, mod.quant_max) > 255:
            qparams = activation_qparams(cast(ObserverBase, mod), name)
            if qparams is not None:
                setattr(prepared, name, FixedFakeQuantize(qparams.scale, qparams.zero_point, qparams.quant_min,
                                                          qparams.quant_max))
    return prepared
