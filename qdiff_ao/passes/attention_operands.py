"""Symmetric quantizers for attention's Q, K and V, so the attention matmuls have no zero-point terms.

In ``softmax(Q K^T / sqrt(d)) V`` both operands of each matmul are activations. With affine quantizers
(``x ~ s (q - z)``) an integer matmul needs the zero-point corrections ``z_K sum(q_Q) + z_Q sum(q_K) - n z_Q z_K``
on top of ``sum(q_Q q_K)``, and inference engines that run attention in INT8 do not take them: OpenVINO's CPU plugin
keeps a matmul of two activations in f32 unless its second operand is signed INT8 with zero point 0 and its first
has no zero point either (its low-precision MatMul rule; NNCF quantizes such matmul inputs symmetrically for the
same reason). Q, K and V of a trained model are projections of normalised hidden states and spread roughly
evenly around 0, so a symmetric grid costs them little.

The pass finds, for each operand of an attention matmul, the activation observer it reads (walking up through
the head reshapes, transposes and the ``1/sqrt(d)`` scaling, which the torch.ao graph does not observe) and
replaces it by the symmetric version of the same observer (``QuantConfig(act_symmetric=True)``): uint8 codes with
zero point 128, i.e. ``x ~ s (q - 128)``, which the ONNX export writes as INT8 with zero point 0 (the same
numbers). The softmax output (the probabilities, unsigned with zero point 0) is left as it is.

:func:`symmetric_attention_operands` (``QuantConfig(attention_symmetric=True)``) makes the swap on a freshly prepared
graph, before calibration (the new observers start empty). :func:`choose_attention_grids` (the default,
``attention_symmetric="measured"``) makes it after calibration, per quantizer, only where it is nearly free: the
symmetric grid of the same statistics must cost at most ``max_cost_bits`` of resolution, measured as
``log2(s_sym / s_aff)``, the ratio of the two grids' steps (each grid's own range search). A range centred on 0
costs nothing; a one-sided range (all values >= 0) costs a whole bit and keeps its affine grid.

Reconstruction keeps the calibrated step of a symmetric Q, K or V (``quantizers.simulation.FIXED_STEP_ATTR``)
instead of learning it: paired on shapes32 W4A8 with the same reconstruction seeds, learning those steps made the
FD 0.17-0.31x FP worse than affine Q/K/V on 3 of 3 seeds; without any step learning symmetric and affine scored
alike, and with only those steps kept the cost halved (mean 1.256x vs 1.176x FP affine; docs/quality/HISTORY.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import operator
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.capture.graph_state import graph_info, has_graph_info
from qdiff_ao.capture.view_ops import is_view_op
from qdiff_ao.config import QuantConfig
from qdiff_ao.observers.softmax import is_softmax_observer
from qdiff_ao.observers.timestep import TimestepAwareObserver
from qdiff_ao.qconfig import MATMUL_TARGETS, activation_observer
from qdiff_ao.quantizers.qdq import ActivationQDQ
from qdiff_ao.quantizers.simulation import FIXED_STEP_ATTR

__all__ = ["AttentionGridChoice", "attention_operand_observers", "attention_operand_quantizers",
           "choose_attention_grids", "is_symmetric_observer", "mark_signed_attention_operands",
           "symmetric_attention_operands"]

logger = logging.getLogger(__name__)

MAX_COST_BITS = 0.5
"""Default price limit of :func:`choose_attention_grids`: a symmetric grid whose step is at most sqrt(2) times the
affine one's. On the zoo models every Q, K and V costs 0.02-0.25 bits (shapes32) and swapping them all changed
neither the eps error nor the FD without reconstruction (README, speed); a one-sided range costs 1 bit."""

_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def is_symmetric_observer(module: nn.Module) -> bool:
    """True for an observer (possibly timestep-aware) with a symmetric qscheme."""
    if isinstance(module, TimestepAwareObserver):
        module = module.base
    return getattr(module, "qscheme", None) in _SYMMETRIC


def _is_scalar_scaling(node: fx.Node) -> bool:
    """``x * c``, ``c * x`` or ``x / c`` with a number ``c`` (not ``c / x``, which is no scaling of ``x``)."""
    if node.op != "call_function":
        return False
    if node.target in (operator.mul, torch.mul):
        return isinstance(node.args[1], (int, float)) or isinstance(node.args[0], (int, float))
    return node.target in (operator.truediv, torch.div) and isinstance(node.args[1], (int, float))


def _quantizer_above(gm: fx.GraphModule, node: fx.Node, is_quantizer: Callable[[nn.Module], bool]) -> str | None:
    """The quantizer module ``node`` reads through shape ops and scalar scalings, or None."""
    cur: Any = node
    while isinstance(cur, fx.Node):
        if cur.op == "call_module":
            return str(cur.target) if is_quantizer(gm.get_submodule(str(cur.target))) else None
        if is_view_op(cur) or (cur.op == "call_method" and cur.target == "to"):  # "to": the dtype cast after heads
            cur = cur.args[0]
        elif _is_scalar_scaling(cur):
            cur = cur.args[0] if isinstance(cur.args[0], fx.Node) else cur.args[1]
        else:
            return None
    return None


def attention_operand_quantizers(gm: fx.GraphModule, is_quantizer: Callable[[nn.Module], bool]) -> list[str]:
    """Names of the quantizer modules (``is_quantizer``) whose outputs are both operands of a matmul between two
    activations (Q, K, V and the softmax output of attention), in graph order, without repeats."""
    names: list[str] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method") or node.target not in MATMUL_TARGETS:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        found = [_quantizer_above(gm, a, is_quantizer) for a in operands]
        if len(operands) == 2 and all(found):
            names += [n for n in found if n is not None and n not in names]
    return names


def attention_operand_observers(gm: fx.GraphModule) -> list[str]:
    """The observers of a prepared graph that quantize attention matmul operands (see
    :func:`attention_operand_quantizers`)."""
    return attention_operand_quantizers(gm, lambda m: isinstance(m, ObserverBase))


def _install_symmetric(prepared: fx.GraphModule, name: str, new: nn.Module, old: nn.Module) -> None:
    """Put the symmetric observer ``new`` at ``name`` in place of ``old`` (on ``old``'s device), marked so that
    reconstruction keeps its calibrated step (module docstring)."""
    setattr(new, FIXED_STEP_ATTR, True)
    device = next((b.device for b in old.buffers()), None)
    prepared.add_submodule(name, new if device is None else new.to(device))


def symmetric_attention_operands(prepared: fx.GraphModule, cfg: QuantConfig) -> list[str]:
    """Replace the observers of attention's Q, K and V by symmetric ones (module docstring); returns their names.

    Softmax observers (unsigned probabilities) and observers that are already symmetric are left alone; nothing
    changes when ``cfg.act_bits`` is None or attention is not quantized. Idempotent.
    """
    if cfg.act_bits is None or not cfg.quantize_attention:
        return []
    factory = activation_observer(dataclasses.replace(cfg, act_symmetric=True))
    replaced = []
    for name in attention_operand_observers(prepared):
        module = prepared.get_submodule(name)
        if is_softmax_observer(module) or is_symmetric_observer(module):  # probabilities keep their grid
            continue
        _install_symmetric(prepared, name, factory(), module)
        replaced.append(name)
    return replaced


@dataclasses.dataclass(frozen=True)
class AttentionGridChoice:
    """One Q, K or V quantizer: what a symmetric grid would cost it and whether it took one."""

    name: str
    cost_bits: float
    """``log2(s_sym / s_aff)``: the resolution the symmetric grid gives up (0 for a range centred on 0)."""
    symmetric: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def choose_attention_grids(prepared: fx.GraphModule, *, max_cost_bits: float = MAX_COST_BITS
                           ) -> list[AttentionGridChoice]:
    """After calibration, give each affine Q, K and V observer the symmetric grid of its own statistics where that
    costs at most ``max_cost_bits`` of resolution (module docstring); returns one choice per Q, K, V observer.

    The symmetric twin is the graph's symmetric activation observer (``QuantConfig(act_symmetric=True)`` of the
    config recorded in the graph) loaded with the calibrated observer's state, so it carries the same histogram,
    range and per-timestep statistics, and its own range search decides its step. Observers already symmetric,
    softmax observers and observers without data are left alone (the first are reported at cost 0).

    Run after calibration and before reconstruction, which keeps the calibrated steps of the symmetric grids it
    chose (``FIXED_STEP_ATTR``) and learns the others; idempotent.
    ``qdiff_ao.quantize`` runs it when ``QuantConfig.attention_symmetric == "measured"``.

    Raises:
        ValueError: if ``prepared`` carries no QuantConfig in its graph info, or ``max_cost_bits`` is negative.
    """
    if not max_cost_bits >= 0:
        raise ValueError(f"max_cost_bits must be >= 0 (bits of resolution a symmetric grid may cost), got "
                         f"{max_cost_bits!r}")
    cfg = graph_info(prepared).config if has_graph_info(prepared) else None
    if cfg is None:
        raise ValueError("choose_attention_grids needs the graph's QuantConfig: prepare with qdiff_ao.prepare, or "
                         "run passes.observe_softmax(prepared, cfg) after your own prepare_fx")
    factory = activation_observer(dataclasses.replace(cfg, act_symmetric=True))
    choices = []
    for name in attention_operand_observers(prepared):
        module = prepared.get_submodule(name)
        if is_softmax_observer(module):  # probabilities keep their unsigned grid
            continue
        if is_symmetric_observer(module):
            choices.append(AttentionGridChoice(name, 0.0, True))
            continue
        base = module.base if isinstance(module, TimestepAwareObserver) else module
        if not getattr(base, "has_data", lambda: True)():  # attention that calibration never reached
            continue
        twin = factory()
        try:
            twin.load_state_dict(module.state_dict())
        except (RuntimeError, KeyError) as err:  # an observer whose state a symmetric twin cannot take
            logger.info("%s keeps its affine grid: its state does not load into %s (%s)", name,
                        type(twin).__name__, err)
            continue
        s_aff = float(cast(ObserverBase, module).calculate_qparams()[0].reshape(-1)[0])
        s_sym = float(cast(ObserverBase, twin).calculate_qparams()[0].reshape(-1)[0])
        cost = max(0.0, math.log2(s_sym / s_aff))
        take = cost <= max_cost_bits
        if take:
            _install_symmetric(prepared, name, twin, module)
        choices.append(AttentionGridChoice(name, cost, take))
    return choices


def mark_signed_attention_operands(gm: fx.GraphModule) -> list[str]:
    """Set ``signed`` on the :class:`~qdiff_ao.quantizers.qdq.ActivationQDQ` modules of an export view that quantize
    attention matmul operands, so the symmetric ones (zero point 128) are written in their INT8 zero-point-0 form;
    returns their names. The softmax output (zero point 0) and affine grids keep their uint8 form."""
    names = attention_operand_quantizers(gm, lambda m: isinstance(m, ActivationQDQ))
    for name in names:
        cast(ActivationQDQ, gm.get_submodule(name)).signed = True
    return names
