"""Quantized attention on integer matmuls for the fbgemm/x86 lowering.

``convert_fx`` lowers Q-Diffusion's quantized attention as float arithmetic on grid values: Q, K and V come out of
their quantized linears as quint8 tensors and are dequantized, the two matmuls run in f32, and only the softmax
output is quantized and dequantized in between:

    Q̂, K̂, V̂ ─dequantize─ heads ─► (c·Q) Kᵀ ─► softmax ─► quantize(s_P, z_P) ─► dequantize ─► P V      (f32 matmuls)

:func:`lower_integer_attention` replaces each such chain by one :class:`IntegerAttention` call that multiplies the
codes on exact integer matmuls (:mod:`qdiff_ao.deploy.attention_kernel`: the arithmetic, the two GEMMs and the
blocking). Only 8-bit probabilities are lowered (16-bit softmax grids stay float: no 16-bit kernel), and only chains
without a mask between the scores and the softmax; every other attention is left as it was.
"""

from __future__ import annotations

import copy
import logging
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx, nn

from qdiff_ao.capture.view_ops import is_view_op
from qdiff_ao.deploy.attention_kernel import (
    BLOCK_ELEMENTS,
    GEMM_ROWS,
    MIN_SCORES_PER_HEAD,
    integer_attention_kernel,
)
from qdiff_ao.deploy.gemm_choice import EXACT_TERMS
from qdiff_ao.qconfig import MATMUL_TARGETS

__all__ = ["BLOCK_ELEMENTS", "GEMM_ROWS", "MIN_SCORES_PER_HEAD", "IntegerAttention", "integer_attention_kernel",
           "lower_integer_attention"]

logger = logging.getLogger(__name__)

_PREFIX = "qdiff_integer_attention_"


class IntegerAttention(nn.Module):
    """One lowered attention: ``forward(q, k_t, v, p_scale, p_zero)`` -> f32 ``[..., N, e]``.

    ``q``, ``k_t`` and ``v`` are the quantized operands in head layout (``k_t`` transposed); the probability grid is
    read from the graph's own qparam buffers at call time, so each timestep group's graph keeps its own.
    ``int_gemm``: which exact GEMM multiplies the codes (:func:`integer_attention_kernel`; None: the faster here for
    each call's block shape, timed on the first call of a shape: during ``optimize_for_inference``'s trace, so the
    frozen graph holds the measured choice).
    """

    def __init__(self, factor: float, int_gemm: bool | None = None) -> None:
        super().__init__()
        self.factor = factor
        self.int_gemm = None if int_gemm is None else bool(int_gemm)

    def forward(self, q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, p_scale: torch.Tensor,
                p_zero: torch.Tensor) -> torch.Tensor:
        return integer_attention_kernel(q, k_t, v, self.factor, float(p_scale), int(p_zero), BLOCK_ELEMENTS,
                                        MIN_SCORES_PER_HEAD, self.int_gemm, EXACT_TERMS, GEMM_ROWS)

    def extra_repr(self) -> str:
        gemm = "measured per shape" if self.int_gemm is None else "int8" if self.int_gemm else "f32 (exact)"
        return f"factor={self.factor}, gemm={gemm}"


@dataclass
class _Match:
    qk: fx.Node
    softmax: fx.Node
    quant: fx.Node
    dequant: fx.Node
    pv: fx.Node
    factor: float
    operands: tuple[tuple[fx.Node, list[fx.Node]], ...]  # (quantized source, view chain top-down) for q, k_t, v
    walked: list[fx.Node]  # the operands' dequantize, shape and scalar nodes, erased once nothing reads them


def _is_matmul(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in MATMUL_TARGETS


def _only_user(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _operand(node: fx.Node, walked: list[fx.Node]) -> tuple[fx.Node, list[fx.Node], float] | None:
    """Walk up from a matmul operand through shape-only ops and scalar multiplies to a ``dequantize``; returns
    (the quantized tensor it dequantizes, the shape ops top-down, the product of the scalars)."""
    chain: list[fx.Node] = []
    factor = 1.0
    while True:
        walked.append(node)
        if node.op == "call_method" and node.target == "dequantize" or (
                node.op == "call_function" and node.target is torch.dequantize):
            source = node.args[0]
            return (source, chain[::-1], factor) if isinstance(source, fx.Node) else None
        if is_view_op(node):
            chain.append(node)
        elif node.op == "call_function" and node.target in (operator.mul, torch.mul) and len(node.args) == 2:
            a, b = node.args
            scalar, tensor = (a, b) if isinstance(a, (int, float)) else (b, a)
            if not isinstance(scalar, (int, float)) or not isinstance(tensor, fx.Node) or not math.isfinite(scalar):
                return None
            factor *= float(scalar)
            node = tensor
            continue
        else:
            return None
        source = node.args[0]
        if not isinstance(source, fx.Node):
            return None
        node = source


def _softmax_dim_is_last(node: fx.Node) -> bool:
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return isinstance(dim, int) and dim == -1 and "dtype" not in node.kwargs


def _match(pv: fx.Node) -> _Match | None:
    """``dequantize(quantize(softmax(qk))) @ V`` with both matmul operands traced back to quantized tensors."""
    if not _is_matmul(pv) or len(pv.args) != 2 or pv.kwargs:
        return None
    dequant, v_node = pv.args
    if not (isinstance(dequant, fx.Node) and isinstance(v_node, fx.Node)):
        return None
    if not (dequant.op == "call_method" and dequant.target == "dequantize" and _only_user(dequant, pv)):
        return None
    quant = dequant.args[0]
    if not (isinstance(quant, fx.Node) and quant.target is torch.quantize_per_tensor and _only_user(quant, dequant)):
        return None
    if (quant.args[3] if len(quant.args) > 3 else quant.kwargs.get("dtype")) is not torch.quint8:
        return None
    softmax = quant.args[0]
    if not (isinstance(softmax, fx.Node) and softmax.target in (torch.softmax, "softmax")
            and _softmax_dim_is_last(softmax) and _only_user(softmax, quant)):
        return None
    qk = softmax.args[0]
    if not (isinstance(qk, fx.Node) and _is_matmul(qk) and len(qk.args) == 2 and not qk.kwargs
            and _only_user(qk, softmax)):
        return None
    walked: list[fx.Node] = []
    found = [_operand(n, walked) for n in (qk.args[0], qk.args[1], v_node) if isinstance(n, fx.Node)]
    if len(found) != 3 or any(f is None for f in found):
        return None
    (qs, qc, qf), (ks, kc, kf), (vs, vc, vf) = found  # type: ignore[misc]
    if vf != 1.0:
        return None
    return _Match(qk, softmax, quant, dequant, pv, qf * kf, ((qs, qc), (ks, kc), (vs, vc)), walked)


def _replay(graph: fx.Graph, source: fx.Node, chain: list[fx.Node]) -> fx.Node:
    """The shape ops of ``chain`` applied to ``source`` (a quantized tensor) instead of its dequantized copy."""
    node = source
    for op in chain:
        node = graph.create_node(op.op, op.target, (node, *op.args[1:]), dict(op.kwargs))
    return node


def lower_integer_attention(converted: fx.GraphModule, int_gemm: bool | None = None) -> fx.GraphModule:
    """A copy of ``converted`` whose 8-bit quantized attentions run on integer matmuls (:class:`IntegerAttention`).

    The copy shares every submodule (packed weights) with ``converted``, which is left unchanged. Attentions that
    do not match (float attention, 16-bit probabilities, masked scores, a scaled V) keep their float chain.
    ``int_gemm`` picks the exact GEMM of the codes (:class:`IntegerAttention`; None: the faster here per block shape).

    Raises:
        TypeError: ``converted`` is not a GraphModule.
    """
    if not isinstance(converted, fx.GraphModule):
        raise TypeError(f"lower_integer_attention needs a converted fx.GraphModule, got {type(converted).__name__}")
    gm = fx.GraphModule(converted, copy.deepcopy(converted.graph))
    gm.meta = dict(converted.meta)
    matches = [m for m in (_match(n) for n in list(gm.graph.nodes)) if m is not None]
    order = {node: i for i, node in enumerate(gm.graph.nodes)}  # graph order of the nodes the matches walked
    for index, m in enumerate(matches):
        name = f"{_PREFIX}{index}"
        gm.add_submodule(name, IntegerAttention(m.factor, int_gemm))
        with gm.graph.inserting_before(m.pv):
            q, k_t, v = (_replay(gm.graph, source, chain) for source, chain in m.operands)
            scale, zero = m.quant.args[1], m.quant.args[2]
            call = gm.graph.call_module(name, (q, k_t, v, scale, zero))
        m.pv.replace_all_uses_with(call)
        for dead in (m.pv, m.dequant, m.quant, m.softmax, m.qk):
            gm.graph.erase_node(dead)
        # the float operands' dequantize/shape nodes, last first; one still read elsewhere (e.g. a K that also
        # feeds another op) stays
        for node in sorted(set(m.walked), key=order.__getitem__, reverse=True):
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    logger.info("integer attention: %d of the graph's attentions lowered", len(matches))
    return gm
