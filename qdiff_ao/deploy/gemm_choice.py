"""Which GEMM multiplies int8 codes fastest on this CPU: ``torch._int_mm`` or an f32 GEMM on the same codes.

``torch._int_mm`` runs oneDNN's int8 GEMM. With AVX-512 VNNI (or AMX) that is the fast path, but on a CPU
without VNNI it can be far slower than f32: on a 2-core AVX2-only AMD EPYC (2 threads) a 256 x 256 x 256 product
took 9.1 ms on ``_int_mm`` against 0.23 ms as an f32 GEMM, and the integer attention kernel ran the CIFAR UNet's
attention 36x slower than the f32 chain it replaces (180.8 vs 5.1 ms). Why oneDNN is that slow there was not
looked into; the measurement below does not need to know.

An f32 GEMM gives the *same* integers whenever every partial sum is exact in f32: codes in [-128, 127] make each
product at most 2^14 in magnitude, so a dot product of at most :data:`EXACT_TERMS` = 2^24 / 2^14 = 1024 terms has
every partial sum an integer of magnitude <= 2^24, which f32 represents exactly, in any summation order. Longer
reductions are cut into pieces of that length, each converted to int32 and summed there. So the choice changes
speed only, never a number, and is made by measuring both on this machine (:func:`int_gemm_is_faster`, once per
process) rather than by reading CPU flags (oneDNN's dispatch, not the flag, decides the speed).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch

__all__ = ["EXACT_TERMS", "int_gemm_is_faster"]

EXACT_TERMS = 1 << 10
"""Longest dot product of int8 codes that an f32 GEMM computes exactly (2^24 / 128^2)."""

_PROBE_SIZE = 256
_PROBE_REPEATS = 5


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def int_gemm_is_faster() -> bool:
    """True when ``torch._int_mm`` beats an f32 GEMM on a 256 x 256 x 256 product of int8 codes here (best of 5
    each, after a warm-up call; a few ms once per process, more on a CPU where ``_int_mm`` is slow)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (_PROBE_SIZE, _PROBE_SIZE), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (_PROBE_SIZE, _PROBE_SIZE), dtype=torch.int8, generator=g)
    af, bf = a.float(), b.float()
    with torch.no_grad():
        torch._int_mm(a, b), torch.mm(af, bf)  # warm-up: oneDNN builds its kernels on first use
        int_seconds = _best_seconds(lambda: torch._int_mm(a, b), _PROBE_REPEATS)
        f32_seconds = _best_seconds(lambda: torch.mm(af, bf), _PROBE_REPEATS)
    return int_seconds < f32_seconds
