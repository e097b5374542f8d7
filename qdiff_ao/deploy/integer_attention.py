"""Quantized attention on integer matmuls for the fbgemm/x86 lowering.

``convert_fx`` lowers Q-Diffusion's quantized attention as float arithmetic on grid values: Q, K and V come out of
their quantized linears as quint8 tensors and are dequantized, the two matmuls run in f32, and only the softmax
output is quantized and dequantized in between:

    Q̂, K̂, V̂ ─dequantize─ heads ─► (c·Q) Kᵀ ─► softmax ─► quantize(s_P, z_P) ─► dequantize ─► P V      (f32 matmuls)

:func:`lower_integer_attention` replaces each such chain by one :class:`IntegerAttention` call that multiplies the
codes. With ``x = s (q - z)`` on each operand's grid and the codes moved to int8 (``q' = q - 128``, ``z' = z - 128``):

    S = s_Q s_K c · [q'k'ᵀ - z'_K Σ_d q' - z'_Q Σ_d k' + d z'_Q z'_K]                   (int32 matmul, exact)
    P = quantize(softmax(S), s_P, z_P)                                                    (the graph's own grid)
    O = s_P s_V · [p'v' - z'_V Σ_m p' - z'_P Σ_m v' + m z'_P z'_V]

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

__all__ = ["BLOCK_ELEMENTS", "MIN_SCORES_PER_HEAD", "IntegerAttention", "integer_attention_kernel",
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
            block_elements: int, min_scores: int, int_gemm: bool, exact_terms: int) -> torch.Tensor:
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
    scale = q.q_scale() * k_t.q_scale() * factor
    key_bias = ki.sum(-2, keepdim=True, dtype=torch.int32) * (-zq * scale)  # [G, 1, M] f32
    value_offset = (zp * vi.sum(-2, keepdim=True, dtype=torch.int32) - m * zp * zv)  # [G, 1, e] int32
    # the z'_V term needs each probability row's code sum: on _int_mm from a column of ones appended to V (the
    # P V product yields it), on the f32 GEMM from a sum over the codes (an odd column count slowed that GEMM by
    # 1.6x on AVX2: 137 vs 83 us for 256 x 1024 x 17 vs x 16)
    # codes are at most 2^7 in magnitude, products of two at most 2^14: a row of up to 128 x exact_terms codes
    # sums exactly in f32 (2^24)
    row_sums = not int_gemm and zv != 0 and m <= 128 * exact_terms
    if zv != 0 and not row_sums:
        vi = torch.cat([vi, torch.ones(groups, m, 1, dtype=torch.int8)], -1)
    if not int_gemm:  # the same codes as f32 for an exact f32 GEMM
        qi, ki, vi = qi.float(), ki.float(), vi.float()
    out_scale = p_scale * v.q_scale()
    inv_p = 1.0 / p_scale
    clamp = p_scale * (127 - zp) < 1.0  # else every probability in [0, 1] has a code in [zp, 127]
    # Blocks of (heads, query rows) whose scores stay in cache: every pass below reads them again
    rows = min(n, max(1, block_elements // m))
    heads = max(1, block_elements // (n * m)) if rows == n else 1
    out = torch.empty(groups, n, e)
    for g0 in range(0, groups, heads):
        g1 = min(groups, g0 + heads)
        if g1 - g0 == 1:  # one head per block, rows at a time: 2-D ops, no per-head slicing
            q_g, k_g, v_g, bias_g, offset_g = qi[g0], ki[g0], vi[g0], key_bias[g0], value_offset[g0]
            for r0 in range(0, n, rows):
                r1 = min(n, r0 + rows)
                probs = torch.softmax(torch.add(bias_g, _gemm(q_g[r0:r1], k_g, int_gemm, exact_terms), alpha=scale), -1)
                codes = _probability_codes(probs, inv_p, zp, clamp, int_gemm)
                acc = _gemm(codes, v_g, int_gemm, exact_terms)
                sums = _row_sums(codes) if row_sums else None
                torch.mul(_value_terms(acc.to(torch.int32), sums, offset_g, zv, e), out_scale, out=out[g0, r0:r1])
        else:  # several whole heads per block
            if int_gemm:
                scores = torch.empty(g1 - g0, n, m, dtype=torch.int32)
                for g in range(g0, g1):
                    torch._int_mm(qi[g], ki[g], out=scores[g - g0])
            else:  # one batched GEMM for the block's heads
                scores = _exact_f32_matmul(qi[g0:g1], ki[g0:g1], exact_terms)
            probs = torch.softmax(torch.add(key_bias[g0:g1], scores, alpha=scale), -1)
            pi = _probability_codes(probs, inv_p, zp, clamp, int_gemm)
            if int_gemm:
                acc = torch.empty(g1 - g0, n, vi.size(-1), dtype=torch.int32)
                for g in range(g0, g1):
                    torch._int_mm(pi[g - g0], vi[g], out=acc[g - g0])
            else:
                acc = _exact_f32_matmul(pi, vi[g0:g1], exact_terms).to(torch.int32)
            sums = _row_sums(pi) if row_sums else None
            torch.mul(_value_terms(acc, sums, value_offset[g0:g1], zv, e), out_scale, out=out[g0:g1])
    shape = list(lead) + [n, e]
    return out.reshape(shape)


def _row_sums(codes: torch.Tensor) -> torch.Tensor:
    """``Σ_m p'`` per row of f32 probability codes, as int32 (exact for rows of up to 2^17 codes)."""
    return codes.sum(-1, keepdim=True).to(torch.int32)


def _value_terms(acc: torch.Tensor, sums: torch.Tensor | None, offset: torch.Tensor, zv: int,
                 e: int) -> torch.Tensor:
    """``p'v' - z'_V Σ_m p' - offset`` in int32 (exact) from the P V product and the row sums ``Σ_m p'`` (when
    ``z'_V != 0``: ``sums``, else the product's last column)."""
    if zv == 0:
        return acc - offset
    if sums is not None:
        return acc - sums * zv - offset
    return acc.narrow(-1, 0, e) - acc.narrow(-1, e, 1) * zv - offset


def _probability_codes(probs: torch.Tensor, inv_p: float, zp: int, clamp: bool, as_int8: bool) -> torch.Tensor:
    """The probabilities' quint8 codes minus 128, computed in place on ``probs`` (round half to even, as
    quantize_per_tensor does); clamped only where the grid ends below probability 1. int8 for ``torch._int_mm``,
    else left in f32 (integer values) for the f32 GEMM."""
    codes = probs.mul_(inv_p).round_().add_(zp)
    codes = codes.clamp_(-128, 127) if clamp else codes
    return codes.to(torch.int8) if as_int8 else codes


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
                             exact_terms: int = EXACT_TERMS) -> torch.Tensor:
    """``quantize(softmax(c Q Kᵀ), s_P, z_P) V`` on integer matmuls (module docstring), in f32.

    Softmax ignores a constant added to a row, so of the zero-point terms of the scores only ``-z'_Q Σ_d k'`` (one
    value per key) is applied, as the float bias of the single pass that scales the int32 scores. The scores are
    made, normalised and quantized in blocks of ``block_elements`` (heads x query rows) that stay in cache; the
    probability codes are computed in place (``round(p / s_P) + z'_P``, clamped only where the grid ends below 1),
    and ``Σ_m p'`` for the ``z'_V`` term comes out of the P V product itself, from a column of ones appended to V.

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
    """
    if int_gemm is None:
        int_gemm = int_gemm_is_faster()
    return cast(torch.Tensor, _scripted_kernel()(q, k_t, v, factor, p_scale, p_zero, block_elements, min_scores,
                                                 int_gemm, exact_terms))


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
                                                     BLOCK_ELEMENTS, MIN_SCORES_PER_HEAD, self.int_gemm, EXACT_TERMS))

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
