"""The integer attention kernel: ``quantize(softmax(c Q Kᵀ), s_P, z_P) V`` from quint8 Q, K and V on exact integer
matmuls (:mod:`qdiff_ao.deploy.integer_attention` puts it into converted graphs).

With ``x = s (q - z)`` on each operand's grid, softmax ignoring a constant added to a row (so K's zero point drops
out), and ``u = round(p / s_P)``, the probability's code above its zero point:

    S = s_Q s_K c · (q - z_Q) k'ᵀ          (+ a constant per row; k' = k - 128)            (exact integer matmul)
    u = round(softmax(S) / s_P)           (clamped where the grid ends below 1)             (the graph's own grid)
    O = s_P s_V · u (v - z_V)                                                               (exact integer matmul)

Two GEMMs give these integers exactly:

- ``torch._int_mm`` (oneDNN's int8 GEMM, VNNI where the CPU has it) needs int8 operands: it multiplies the codes
  moved to int8 (``q' = q - 128``, ``z' = z - 128``, ``p' = u + z'_P``) and applies the zero points in int32:
  ``(q - z_Q) k'ᵀ = q'k'ᵀ - z'_Q Σ_d k'`` and ``u (v - z_V) = p'v' - z'_V Σ_m p' - z'_P (Σ_m v' - m z'_V)``
  (``Σ_m p'`` from a column of ones appended to V).
- An f32 GEMM multiplies ``q - z_Q``, ``k'``, ``u`` and ``v - z_V`` as they are: products below 2^15, and since
  a row's probabilities sum to 1, ``Σ_m u <= 1/s_P + m/2`` keeps the P V partial sums far below 2^24, where f32
  is exact in any order (longer reductions are cut into pieces summed in int32).

Both give the same integers, so the same output bit for bit; each block shape runs on the one that was faster for
that shape here (:func:`int_gemm_is_faster_for`, timed once per shape and process; see
:mod:`qdiff_ao.deploy.gemm_choice`: without VNNI ``_int_mm`` was ~40x slower, with VNNI faster for large heads and
slower for many small ones). The same numbers as the f32 chain up to f32 rounding (a probability on a rounding tie
may move one code). The per-head loop is TorchScript, so :func:`~qdiff_ao.deploy.freezing.freeze_graph` keeps it
as a loop and any batch size runs.

Heads with fewer than :data:`MIN_SCORES_PER_HEAD` scores run the f32 chain itself inside the kernel (a GEMM call
per head costs more than it saves there); the choice is made per call from the shapes, as are the blocks.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch

from qdiff_ao.deploy.gemm_choice import EXACT_TERMS, faster_is_first

__all__ = ["BLOCK_ELEMENTS", "GEMM_ROWS", "MIN_SCORES_PER_HEAD", "int_gemm_is_faster_for", "integer_attention_kernel",
           "measured_int_gemm"]

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
rows: with head dimension 16 and 1,024 keys, MKL's f32 GEMM took longer for 256 rows at once on 2 threads than on
one (229 vs 139 us), and 4 chunks of 64 rows as one ``bmm`` took 89 us against 177 us for the single GEMM (another
run; AVX2-only AMD EPYC; the SD-shaped attention's whole kernel 32 -> 27 ms). ``_int_mm`` (VNNI) is left as it was
measured."""


def _signed_codes(x: torch.Tensor) -> torch.Tensor:
    """int8 codes ``q - 128`` of a quint8 tensor: the uint8 bits read as int8 (a wrapping cast), top bit flipped."""
    return torch.bitwise_xor(x.int_repr().to(torch.int8), -128)


def _exact_f32_matmul(a: torch.Tensor, b: torch.Tensor, terms: int) -> torch.Tensor:
    """``a @ b`` of f32 tensors holding integers, exact when any ``terms`` products sum within 2^24 (the caller's
    bound, e.g. ``EXACT_TERMS`` for int8 codes, :mod:`~qdiff_ao.deploy.gemm_choice`): one f32 GEMM when the
    reduction has at most ``terms`` terms, else int32 summed over pieces of that length."""
    k = a.size(-1)
    if k <= terms:
        return torch.matmul(a, b)
    out = torch.matmul(a.narrow(-1, 0, terms), b.narrow(-2, 0, terms)).to(torch.int32)
    for c0 in range(terms, k, terms):
        c = min(terms, k - c0)
        out += torch.matmul(a.narrow(-1, c0, c), b.narrow(-2, c0, c)).to(torch.int32)
    return out


def _kernel(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, factor: float, p_scale: float, p_zero: int,
            block_elements: int, min_scores: int, int_gemm: bool, exact_terms: int, gemm_rows: int) -> torch.Tensor:
    """TorchScript body of :func:`integer_attention_kernel`."""
    n, d, m, e = q.size(-2), q.size(-1), k_t.size(-1), v.size(-1)
    if not _multiplies_codes(q, k_t, v, min_scores):
        probs = torch.softmax(torch.matmul(q.dequantize() * factor, k_t.dequantize()), -1)
        grid_probs = torch.quantize_per_tensor(probs, p_scale, p_zero, torch.quint8).dequantize()
        return torch.matmul(grid_probs, v.dequantize())
    lead = q.shape[:-2]
    zq, zv, zp = q.q_zero_point(), v.q_zero_point(), p_zero
    # row-major copies: torch._int_mm reads degenerate strides (a size-1 dimension of a transposed view) wrongly
    ki = _signed_codes(k_t).reshape(-1, d, m).contiguous()
    if int_gemm:  # int8 operands: q' and v' (codes - 128), the zero points applied in int32
        qi = _signed_codes(q).reshape(-1, n, d).contiguous()
        vi = _signed_codes(v).reshape(-1, m, e).contiguous()
        key_bias = ki.sum(-2, keepdim=True, dtype=torch.int32) * (128 - zq)  # [G, 1, M]: -(z_Q - 128) sum_d k'
        if zv != 128:  # sum_m p' for the (z_V - 128) term, from a column of ones appended to V
            vi = torch.cat([vi, torch.ones(vi.size(0), m, 1, dtype=torch.int8)], -1)
        value_offset = (zp - 128) * (vi.narrow(-1, 0, e).sum(-2, keepdim=True, dtype=torch.int32) - m * (zv - 128))
    else:  # f32 operands holding a = q - z_Q, k' and w = v - z_V: the GEMMs need no zero-point terms
        qi = (q.int_repr().reshape(-1, n, d).float() - zq).contiguous()
        vi = (v.int_repr().reshape(-1, m, e).float() - zv).contiguous()
        ki = ki.float()
        key_bias = torch.zeros(1, 1, 1, dtype=torch.int32)
        value_offset = torch.zeros(1, 1, 1, dtype=torch.int32)
    # |a| <= 255 and |k'| <= 128: products below 2^15, so a reduction of exact_terms / 2 terms stays within 2^24
    score_terms = max(1, exact_terms // 2)
    # u = round(p / s_P) >= 0 and |w| <= 255: every partial sum of u w is at most 255 sum(u), and the
    # probabilities of a row sum to 1 up to f32 rounding, so sum(u) <= (1 + (m + 4) 2^-23) / s_P + m/2
    units_bound = 255.0 * ((1.0 + (m + 4) * 1.2e-7) / p_scale + 0.5 * m)
    one_product = units_bound <= 16384.0 * exact_terms  # 2^24 at EXACT_TERMS
    key_piece = max(1, (16384 * exact_terms) // (255 * 255))  # else pieces of keys, each sum within 2^24
    groups = ki.size(0)
    # scores in base 2 (softmax(x) = 2^(x log2 e) / sum 2^(x log2 e)): exp2 took half the time of exp on AVX2
    scale = q.q_scale() * k_t.q_scale() * factor * 1.4426950408889634
    inv_p = 1.0 / p_scale
    top = 255 - zp  # the largest code above the zero point: u <= top
    clamp = p_scale * top < 1.0  # else every probability in [0, 1] rounds to a code <= top
    out_scale = p_scale * v.q_scale()
    heads, rows = _block_shape(n, m, block_elements)
    one = heads == 1  # one head per block, rows at a time: 2-D ops; else whole heads, 3-D
    if not one and not int_gemm:
        # several heads: the P V product as (w^T u^T)^T, which MKL ran 1.16-3.7x faster than u w for e <= 32
        # (4 heads of 256 x 256 scores, e = 8: 53 vs 198 us; AVX2, 2 threads) and as fast for e = 256 or 77 keys
        vi = vi.transpose(-1, -2).contiguous()
    out = torch.empty(groups, n, e)
    for g0 in range(0, groups, heads):
        g1 = min(groups, g0 + heads)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            if int_gemm:
                scores = (_int_mm_heads(qi[g0, r0:r1], ki[g0]).add_(key_bias[g0]) if one
                          else _int_mm_heads(qi[g0:g1], ki[g0:g1]).add_(key_bias[g0:g1]))
            else:
                scores = _f32_scores(qi, ki, g0, g1, r0, r1, one, score_terms, gemm_rows)
            units = _probability_units(scores, scale, inv_p, top, clamp)
            v_g = vi[g0] if one else vi[g0:g1]
            if int_gemm:
                acc = _int_mm_heads(units.add_(float(zp - 128)).to(torch.int8), v_g)
                if zv != 128:
                    acc = acc.narrow(-1, 0, e) - acc.narrow(-1, e, 1) * (zv - 128)
                values = acc - (value_offset[g0] if one else value_offset[g0:g1])
            elif one:
                values = torch.mm(units, v_g) if one_product else _exact_f32_matmul(units, v_g, key_piece)
            else:  # transposed V (above)
                units_t = units.transpose(-1, -2)
                values = (torch.bmm(v_g, units_t) if one_product else _exact_f32_matmul(v_g, units_t, key_piece)
                          ).transpose(-1, -2)
            torch.mul(values, out_scale, out=out[g0, r0:r1] if one else out[g0:g1])
    shape = list(lead) + [n, e]
    return out.reshape(shape)


def _multiplies_codes(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, min_scores: int) -> bool:
    """Whether the kernel multiplies the codes on a GEMM, else it runs the f32 chain: small heads (fewer than
    ``min_scores`` scores) run faster as one batched f32 matmul than as a GEMM call per head, and other code types
    (qint8) are not the quint8 codes the integer path assumes."""
    quint8 = q.dtype == torch.quint8 and k_t.dtype == torch.quint8 and v.dtype == torch.quint8
    return quint8 and q.size(-2) * k_t.size(-1) >= min_scores


def _block_shape(n: int, m: int, block_elements: int) -> tuple[int, int]:
    """(heads, query rows) of one block of ``n x m``-score heads: at most ``block_elements`` scores, so the block
    stays in cache for every pass that reads it again; whole heads where one fits, else rows of one head."""
    rows = min(n, max(1, block_elements // m))
    heads = max(1, block_elements // (n * m)) if rows == n else 1
    return heads, rows


def _f32_scores(qi: torch.Tensor, ki: torch.Tensor, g0: int, g1: int, r0: int, r1: int, one: bool, terms: int,
                gemm_rows: int) -> torch.Tensor:
    """The exact integer scores ``a k'`` on the f32 GEMM: rows ``r0:r1`` of head ``g0`` (``one``) or whole heads
    ``g0:g1``."""
    if not one:
        return _exact_f32_matmul(qi[g0:g1], ki[g0:g1], terms)  # one batched GEMM for the block's heads
    rows, d, m = r1 - r0, qi.size(-1), ki.size(-1)
    if 0 < gemm_rows < rows and rows % gemm_rows == 0 and d <= terms:
        # row chunks as a batch: each thread multiplies whole chunks (GEMM_ROWS)
        chunks = rows // gemm_rows
        q_rows = qi[g0, r0:r1].view(chunks, gemm_rows, d)
        return torch.bmm(q_rows, ki[g0].expand(chunks, d, m)).view(rows, m)
    return _exact_f32_matmul(qi[g0, r0:r1], ki[g0], terms)


def _probability_units(scores: torch.Tensor, scale: float, inv_p: float, top: int, clamp: bool) -> torch.Tensor:
    """``u = round(softmax(c S) / s_P)`` from exact integer scores ``S`` (int32 or f32), clamped to ``top`` where the
    grid ends below 1; f32, in place after the first pass. The row maximum is taken on the integers (exact), the
    shifted scores are scaled to base 2 in one pass, ``2^x`` is normalised and scaled to the grid in one multiply
    (softmax's normalise pass and the quantizer's scale pass in one), rounded half to even as ``quantize_per_tensor``
    does."""
    shift = scores.amax(-1, keepdim=True).float().mul_(-scale)
    x = torch.add(shift, scores, alpha=scale).exp2_()
    units = x.mul_(torch.reciprocal(x.sum(-1, keepdim=True)).mul_(inv_p)).round_()
    return units.clamp_max_(float(top)) if clamp else units


def _int_mm_heads(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of int8 matrices (one head) or stacks of them (several heads) on ``torch._int_mm``, int32 (it takes
    2-D operands only, so a stack is multiplied head by head into one output)."""
    if a.dim() == 2:
        return torch._int_mm(a, b)
    out = torch.empty(a.size(0), a.size(1), b.size(-1), dtype=torch.int32)
    for g in range(a.size(0)):
        torch._int_mm(a[g], b[g], out=out[g])
    return out


def measured_int_gemm(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, block_elements: int = BLOCK_ELEMENTS,
                      min_scores: int = MIN_SCORES_PER_HEAD, exact_terms: int = EXACT_TERMS,
                      gemm_rows: int = GEMM_ROWS) -> bool:
    """The GEMM of the codes for this call: :func:`int_gemm_is_faster_for` its block shape, where the kernel uses a
    GEMM at all (False where it keeps the f32 chain: no GEMM of codes runs, nothing to time)."""
    if not _multiplies_codes(q, k_t, v, min_scores):
        return False
    n, d, m, e = q.size(-2), q.size(-1), k_t.size(-1), v.size(-1)
    heads, rows = _block_shape(n, m, block_elements)
    groups = max(1, q.numel() // max(1, n * d))  # a block never holds more heads than the call has
    return int_gemm_is_faster_for(min(heads, groups), rows, d, m, e, block_elements, exact_terms, gemm_rows)


@functools.cache
def int_gemm_is_faster_for(heads: int, rows: int, d: int, m: int, e: int, block_elements: int = BLOCK_ELEMENTS,
                           exact_terms: int = EXACT_TERMS, gemm_rows: int = GEMM_ROWS) -> bool:
    """True when the kernel runs one block of ``heads`` heads x ``rows`` query rows (head dimension ``d``, ``m``
    keys, value dimension ``e``) faster with its codes on ``torch._int_mm`` than on the exact f32 GEMM here.

    Timed on random codes of that shape (:func:`~qdiff_ao.deploy.gemm_choice.faster_is_first`: best of 5 after 2
    warm-up calls each; well under a second per shape, once per shape and process). The block, not the whole
    attention, is what the kernel repeats, so its time ranks the two GEMMs for any batch size of that shape.
    """
    g = torch.Generator().manual_seed(0)

    def codes(*shape: int) -> torch.Tensor:
        values = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        return torch._make_per_tensor_quantized_tensor(values, 0.05, 128)

    q, k_t, v = codes(heads, rows, d), codes(heads, d, m), codes(heads, m, e)
    kernel = _scripted_kernel()

    def run(int_gemm: bool) -> Callable[[], object]:
        return lambda: kernel(q, k_t, v, 1.0 / math.sqrt(d), 1.0 / 255, 0, block_elements, 0, int_gemm, exact_terms,
                              gemm_rows)

    return faster_is_first(run(True), run(False))


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

    The scores are made, normalised and quantized in blocks of ``block_elements`` (heads x query rows) that stay in
    cache; the probability codes above the zero point, ``u = round(p / s_P)``, are computed in place from the exact
    integer scores (their row maximum subtracted on the integers, softmax in base 2, its normalisation and the
    grid's scale in one multiply, clamped only where the grid ends below 1).

    Args:
        q: quint8 [..., N, d]; k_t: quint8 [..., d, M] (K already transposed); v: quint8 [..., M, e].
        factor: the scalar ``c`` the graph multiplies the scores by (e.g. 1/sqrt(d)).
        p_scale, p_zero: the probabilities' 8-bit unsigned grid.
        block_elements: scores per block (:data:`BLOCK_ELEMENTS`).
        min_scores: heads with fewer scores (N x M) run convert_fx's f32 chain instead (:data:`MIN_SCORES_PER_HEAD`).
        int_gemm: multiply the codes on ``torch._int_mm`` (True) or exactly on an f32 GEMM (False); the same
            numbers either way. None: whichever was faster here on a block of this call's shape
            (:func:`int_gemm_is_faster_for`).
        exact_terms: the f32 GEMM's longest exact reduction (:data:`~qdiff_ao.deploy.gemm_choice.EXACT_TERMS`;
            smaller values only cut reductions into more pieces, for tests).
        gemm_rows: on the f32 GEMM, a one-head block's score product runs as a batch of chunks of this many query
            rows (:data:`GEMM_ROWS`; 0: one GEMM per block).
    """
    if int_gemm is None:
        int_gemm = measured_int_gemm(q, k_t, v, block_elements, min_scores, exact_terms, gemm_rows)
    return cast(torch.Tensor, _scripted_kernel()(q, k_t, v, factor, p_scale, p_zero, block_elements, min_scores,
                                                 int_gemm, exact_terms, gemm_rows))
