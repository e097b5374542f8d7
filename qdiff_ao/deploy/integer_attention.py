"""Quantized attention on integer matmuls for the fbgemm/x86 lowering.

``convert_fx`` lowers Q-Diffusion's quantized attention as float arithmetic on grid values: Q, K and V come out of
their quantized linears as quint8 tensors and are dequantized, the two matmuls run in f32, and only the softmax
output is quantized and dequantized in between:

    Q̂, K̂, V̂ ─dequantize─ heads ─► (c·Q) Kᵀ ─► softmax ─► quantize(s_P, z_P) ─► dequantize ─► P V      (f32 matmuls)

:func:`lower_integer_attention` replaces each such chain by one :class:`IntegerAttention` call that multiplies the
codes. With ``x = s (q - z)`` on each operand's grid and the codes moved to int8 (``q' = q - 128``, ``z' = z - 128``):

    S = s_Q s_K c · [q'k'ᵀ - z'_K Σ_d q' - z'_Q Σ_d k' + d z'_Q z'_K]                   (int32 matmul, exact)
    P = quantize(softmax(S), s_P, z_P)                                                    (the graph's own grid)
    O = s_P s_V · [p'v' - z'_V Σ_m p' - z'_P Σ_m v' + m z'_P z'_V]  =  s_P s_V · [u v' - z'_V Σ_m u]

with ``u = p' - z'_P = round(p / s_P) >= 0``, the probability's code above its zero point. ``_int_mm`` needs int8
operands, so it multiplies ``p'``; the f32 GEMM multiplies ``u`` (no ``z'_P`` terms, and since the probabilities
of a row sum to 1, ``Σ_m u <= 1/s_P + m/2`` keeps the product's partial sums small).

The same numbers as the f32 chain up to f32 rounding of the sums (a probability on a rounding tie may move one
code); the matmuls run on ``torch._int_mm`` (oneDNN's int8 GEMM, VNNI where the CPU has it) or, where that is the
slower of the two (measured once per process: :mod:`qdiff_ao.deploy.gemm_choice`; without VNNI it was ~40x
slower), on an f32 GEMM of the same codes, which yields the same integers (bit-identical outputs). The per-head loop is
TorchScript, so :func:`~qdiff_ao.deploy.freezing.freeze_graph` keeps it as a loop and any batch size runs.

Heads with fewer than :data:`MIN_SCORES_PER_HEAD` scores run the f32 chain itself inside the kernel (a GEMM call
per head costs more than it saves there); the choice is made per call from the shapes. Only 8-bit probabilities
are lowered (16-bit softmax grids stay float: no 16-bit kernel), and only chains without a mask between the scores
and the softmax; every other attention is left as it was.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn

from qdiff_ao.capture.view_ops import is_view_op
from qdiff_ao.deploy.gemm_choice import EXACT_TERMS, int_gemm_is_faster
from qdiff_ao.qconfig import MATMUL_TARGETS

__all__ = ["BLOCK_ELEMENTS", "GEMM_ROWS", "MIN_SCORES_PER_HEAD", "IntegerAttention", "integer_attention_kernel",
           "lower_integer_attention"]

logger = logging.getLogger(__name__)

_PREFIX = "qdiff_integer_attention_"

MIN_SCORES_PER_HEAD = 1 << 16
"""Heads with fewer scores than this (N x M) keep the f32 chain: a GEMM call per head costs ~13 us of dispatch,
more than the int8 arithmetic saves on small heads. Measured (2 threads, AVX-512 + VNNI; f32 chain / integer time):
8 x 8 heads of 64 x 64 scores 0.27, 8 x 8 heads of 128 x 128 0.99, 8 x 8 heads of 256 x 256 1.42, 1 x 8 heads of
1,024 x 1,024 5.97 (the digits model's 8-head 8 x 8 attention ran 1.6x slower at batch 8 before this limit)."""

BLOCK_ELEMENTS = 1 << 18
"""Scores per block (1 MiB of f32), so the softmax, quantize and sum passes run in cache. Measured (2 threads,
AVX-512 + VNNI, ``/work/runs/s14/block_sweep.py`` in the session note): 8 x 32 heads of 256 x 256 scores took
99 ms as one block, 15.4 ms in blocks of 2^18 (34 ms at 2^14, 53 ms at 2^19); 2 x 8 heads of 1024 x 1024: 14.5 ms
(58 ms at 2^14, 55 ms at 2^20)."""

GEMM_ROWS = 64
"""On the f32 GEMM, a one-head block's score product ``q'k'`` (rows x d x M) runs as a batch of chunks of this many
rows: with head dimension 16 and 1,024 keys, MKL's f32 GEMM on 2 threads took longer for 256 rows at once than one
thread did (177 vs 139 us), and 4 chunks of 64 rows as one ``bmm`` 89 us (AVX2-only AMD EPYC, 2 threads; the
SD-shaped attention's whole kernel 32 -> 27 ms). ``_int_mm`` (VNNI) is left as it was measured."""


def _signed_codes(x: torch.Tensor) -> torch.Tensor:
    """int8 codes ``q - 128`` of a quint8 tensor: the uint8 bits read as int8 (a wrapping cast), top bit flipped."""
    return torch.bitwise_xor(x.int_repr().to(torch.int8), -128)


def _exact_f32_matmul(a: torch.Tensor, b: torch.Tensor, terms: int) -> torch.Tensor:
    """``a @ b`` of f32 tensors holding int8 codes, exact (:mod:`~qdiff_ao.deploy.gemm_choice`): f32 when the
    reduction has at most ``terms`` (``EXACT_TERMS``) terms, else int32 summed over pieces of that length."""
    k = a.size(-1)
    if k <= terms:
        return torch.matmul(a, b)
    out = torch.matmul(a.narrow(-1, 0, terms), b.narrow(-2, 0, terms)).to(torch.int32)
    for c0 in range(terms, k, terms):
        c = min(terms, k - c0)
        out += torch.matmul(a.narrow(-1, c0, c), b.narrow(-2, c0, c)).to(torch.int32)
    return out


def _gemm(a: torch.Tensor, b: torch.Tensor, int_gemm: bool, terms: int) -> torch.Tensor:
    """The exact product of two 2-D code matrices: int32 from ``torch._int_mm`` (int8 operands), or the same
    integers from an f32 GEMM (f32 operands)."""
    return torch._int_mm(a, b) if int_gemm else _exact_f32_matmul(a, b, terms)


def _kernel(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, factor: float, p_scale: float, p_zero: int,
            block_elements: int, min_scores: int, int_gemm: bool, exact_terms: int, gemm_rows: int) -> torch.Tensor:
    """TorchScript body of :func:`integer_attention_kernel`."""
    n, d, m, e = q.size(-2), q.size(-1), k_t.size(-1), v.size(-1)
    # small heads: one batched f32 matmul beats a GEMM call per head; other code types (qint8): the codes below
    # assume quint8
    if n * m < min_scores or q.dtype != torch.quint8 or k_t.dtype != torch.quint8 or v.dtype != torch.quint8:
        probs = torch.softmax(torch.matmul(q.dequantize() * factor, k_t.dequantize()), -1)
        grid_probs = torch.quantize_per_tensor(probs, p_scale, p_zero, torch.quint8).dequantize()
        return torch.matmul(grid_probs, v.dequantize())
    lead = q.shape[:-2]
    # row-major copies: torch._int_mm reads degenerate strides (a size-1 dimension of a transposed view) wrongly
    qi = _signed_codes(q).reshape(-1, n, d).contiguous()
    ki = _signed_codes(k_t).reshape(-1, d, m).contiguous()
    vi = _signed_codes(v).reshape(-1, m, e).contiguous()
    zq, zv, zp = q.q_zero_point() - 128, v.q_zero_point() - 128, p_zero - 128
    groups = qi.size(0)
    # scores in base 2 (softmax(x) = 2^(x log2 e) / sum 2^(x log2 e)): exp2 took half the time of exp on AVX2
    scale = q.q_scale() * k_t.q_scale() * factor * 1.4426950408889634
    key_bias = ki.sum(-2, keepdim=True, dtype=torch.int32) * (-zq * scale)  # [G, 1, M] f32
    inv_p = 1.0 / p_scale
    top = 255 - p_zero  # the largest code above the zero point: u <= top
    clamp = p_scale * top < 1.0  # else every probability in [0, 1] rounds to a code <= top
    # f32 GEMM of u >= 0 with |v'| <= 2^7: every partial sum is at most 2^7 sum(u) <= 2^7 (1/s_P + m/2) (rounding
    # adds at most 1/2 per key), exact while that stays within 2^14 exact_terms (2^24); else pieces of keys
    one_gemm = inv_p * 1.000001 + 0.5 * m <= 128.0 * exact_terms
    key_piece = max(1, (128 * exact_terms) // 255)  # u <= 255: pieces of this many keys sum exactly
    # the z'_V term needs sum(u) per row: from a column of ones appended to V on _int_mm and for long rows (the
    # product yields it), else a sum over u (an odd column count slowed the f32 GEMM 1.6x on AVX2)
    ones_column = zv != 0 and (int_gemm or not one_gemm)
    if ones_column:
        vi = torch.cat([vi, torch.ones(groups, m, 1, dtype=torch.int8)], -1)
    # on _int_mm the codes are p' = u + z'_P (int8), which adds z'_P (sum(v') - m z'_V) to p'(v' - z'_V)
    if int_gemm:
        value_offset = zp * vi.narrow(-1, 0, e).sum(-2, keepdim=True, dtype=torch.int32) - m * zp * zv
    else:  # the same codes as f32 for an exact f32 GEMM; u needs no offset
        value_offset = torch.zeros(groups, 1, e, dtype=torch.int32)
        qi, ki, vi = qi.float(), ki.float(), vi.float()
    out_scale = p_scale * v.q_scale()
    # Blocks of (heads, query rows) whose scores stay in cache: every pass below reads them again
    rows = min(n, max(1, block_elements // m))
    heads = max(1, block_elements // (n * m)) if rows == n else 1
    out = torch.empty(groups, n, e)
    for g0 in range(0, groups, heads):
        g1 = min(groups, g0 + heads)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            one = g1 - g0 == 1  # one head, rows at a time: 2-D ops
            scores = _scores(qi, ki, g0, g1, r0, r1, int_gemm, exact_terms, gemm_rows)
            units = _probability_units(scores, key_bias[g0] if one else key_bias[g0:g1], scale, inv_p, top, clamp)
            v_g = vi[g0] if one else vi[g0:g1]
            if int_gemm:
                acc = _int_products(units.add_(float(zp)).to(torch.int8), v_g)
            elif one_gemm:
                acc = torch.matmul(units, v_g).to(torch.int32)
            else:
                acc = _exact_f32_matmul(units, v_g, key_piece).to(torch.int32)
            if ones_column:
                values = acc.narrow(-1, 0, e) - acc.narrow(-1, e, 1) * zv
            elif zv != 0:
                values = acc - units.sum(-1, keepdim=True).to(torch.int32) * zv  # sum(u) <= 2^24: exact
            else:
                values = acc
            values = values - (value_offset[g0] if one else value_offset[g0:g1])
            torch.mul(values, out_scale, out=out[g0, r0:r1] if one else out[g0:g1])
    shape = list(lead) + [n, e]
    return out.reshape(shape)


def _scores(qi: torch.Tensor, ki: torch.Tensor, g0: int, g1: int, r0: int, r1: int, int_gemm: bool,
            exact_terms: int, gemm_rows: int) -> torch.Tensor:
    """The exact integer scores ``q'k'`` of heads ``g0:g1`` (rows ``r0:r1`` of one head): int32 on ``_int_mm``,
    f32 holding the same integers on the f32 GEMM."""
    if g1 - g0 == 1:
        rows, d, m = r1 - r0, qi.size(-1), ki.size(-1)
        if not int_gemm and 0 < gemm_rows < rows and rows % gemm_rows == 0 and d <= exact_terms:
            # row chunks as a batch: each thread multiplies whole chunks (GEMM_ROWS)
            chunks = rows // gemm_rows
            q_rows = qi[g0, r0:r1].view(chunks, gemm_rows, d)
            return torch.bmm(q_rows, ki[g0].expand(chunks, d, m)).view(rows, m)
        return _gemm(qi[g0, r0:r1], ki[g0], int_gemm, exact_terms)
    if int_gemm:
        scores = torch.empty(g1 - g0, qi.size(1), ki.size(-1), dtype=torch.int32)
        for g in range(g0, g1):
            torch._int_mm(qi[g], ki[g], out=scores[g - g0])
        return scores
    return _exact_f32_matmul(qi[g0:g1], ki[g0:g1], exact_terms)  # one batched GEMM for the block's heads


def _probability_units(scores: torch.Tensor, key_bias: torch.Tensor, scale: float, inv_p: float, top: int,
                       clamp: bool) -> torch.Tensor:
    """``u = round(softmax(x) / s_P)`` (clamped to ``top`` where the grid ends below 1), ``x = scale q'k' + bias``
    in base 2, in f32 and in place after the first pass: ``2^(x - max x)``, normalised and scaled to the grid in one
    multiply (softmax's own normalise pass and the quantizer's scale pass in one), rounded half to even as
    ``quantize_per_tensor`` does."""
    x = torch.add(key_bias, scores, alpha=scale)
    x = x.sub_(x.amax(-1, keepdim=True)).exp2_()
    units = x.mul_(torch.reciprocal(x.sum(-1, keepdim=True)).mul_(inv_p)).round_()
    return units.clamp_max_(float(top)) if clamp else units


def _int_products(codes: torch.Tensor, v_codes: torch.Tensor) -> torch.Tensor:
    """``codes @ v_codes`` of int8 matrices (one head) or stacks of them (several heads) on ``torch._int_mm``."""
    if codes.dim() == 2:
        return torch._int_mm(codes, v_codes)
    acc = torch.empty(codes.size(0), codes.size(1), v_codes.size(-1), dtype=torch.int32)
    for g in range(codes.size(0)):
        torch._int_mm(codes[g], v_codes[g], out=acc[g])
    return acc


@functools.cache
def _scripted_kernel() -> Any:
    """:func:`_kernel` compiled by TorchScript once, on first use (so importing qdiff_ao compiles nothing):
    scripted, its per-head loops stay loops when :func:`~qdiff_ao.deploy.freezing.freeze_graph` traces the graph,
    so a frozen UNet runs any batch size."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
        return torch.jit.script(_kernel)


def integer_attention_kernel(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, factor: float, p_scale: float,
                             p_zero: int, block_elements: int = BLOCK_ELEMENTS,
                             min_scores: int = MIN_SCORES_PER_HEAD, int_gemm: bool | None = None,
                             exact_terms: int = EXACT_TERMS, gemm_rows: int = GEMM_ROWS) -> torch.Tensor:
    """``quantize(softmax(c Q Kᵀ), s_P, z_P) V`` on integer matmuls (module docstring), in f32.

    Softmax ignores a constant added to a row, so of the zero-point terms of the scores only ``-z'_Q Σ_d k'`` (one
    value per key) is applied, as the float bias of the single pass that scales the int32 scores. The scores are
    made, normalised and quantized in blocks of ``block_elements`` (heads x query rows) that stay in cache; the
    probability codes above the zero point, ``u = round(p / s_P)``, are computed in place (softmax in base 2, its
    normalisation and the grid's scale in one multiply, clamped only where the grid ends below 1).

    Args:
        q: quint8 [..., N, d]; k_t: quint8 [..., d, M] (K already transposed); v: quint8 [..., M, e].
        factor: the scalar ``c`` the graph multiplies the scores by (e.g. 1/sqrt(d)).
        p_scale, p_zero: the probabilities' 8-bit unsigned grid.
        block_elements: scores per block (:data:`BLOCK_ELEMENTS`).
        min_scores: heads with fewer scores (N x M) run convert_fx's f32 chain instead (:data:`MIN_SCORES_PER_HEAD`).
        int_gemm: multiply the codes on ``torch._int_mm`` (True) or exactly on an f32 GEMM (False); the same
            numbers either way. None: whichever is faster on this CPU
            (:func:`~qdiff_ao.deploy.gemm_choice.int_gemm_is_faster`).
        exact_terms: the f32 GEMM's longest exact reduction (:data:`~qdiff_ao.deploy.gemm_choice.EXACT_TERMS`;
            smaller values only cut reductions into more pieces, for tests).
        gemm_rows: on the f32 GEMM, a one-head block's score product runs as a batch of chunks of this many query
            rows (:data:`GEMM_ROWS`; 0: one GEMM per block).
    """
    if int_gemm is None:
        int_gemm = int_gemm_is_faster()
    return cast(torch.Tensor, _scripted_kernel()(q, k_t, v, factor, p_scale, p_zero, block_elements, min_scores,
                                                 int_gemm, exact_terms, gemm_rows))


class IntegerAttention(nn.Module):
    """One lowered attention: ``forward(q, k_t, v, p_scale, p_zero)`` -> f32 ``[..., N, e]``.

    ``q``, ``k_t`` and ``v`` are the quantized operands in head layout (``k_t`` transposed); the probability grid is
    read from the graph's own qparam buffers at call time, so each timestep group's graph keeps its own.
    ``int_gemm``: which exact GEMM multiplies the codes (:func:`integer_attention_kernel`; None: the faster here).
    """

    def __init__(self, factor: float, int_gemm: bool | None = None) -> None:
        super().__init__()
        self.factor = factor
        self.int_gemm = int_gemm_is_faster() if int_gemm is None else bool(int_gemm)

    def forward(self, q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, p_scale: torch.Tensor,
                p_zero: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, _scripted_kernel()(q, k_t, v, self.factor, float(p_scale), int(p_zero),
                                                     BLOCK_ELEMENTS, MIN_SCORES_PER_HEAD, self.int_gemm, EXACT_TERMS,
                                                     GEMM_ROWS))

    def extra_repr(self) -> str:
        return f"factor={self.factor}, gemm={'int8' if self.int_gemm else 'f32 (exact)'}"


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
    ``int_gemm`` picks the exact GEMM of the codes (:class:`IntegerAttention`; None: the faster on this CPU).

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
