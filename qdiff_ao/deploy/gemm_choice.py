"""Which GEMM multiplies int8 codes fastest here: ``torch._int_mm`` or an f32 GEMM on the same codes, decided by
timing both on the work itself.

``torch._int_mm`` runs oneDNN's int8 GEMM. With AVX-512 VNNI (or AMX) that is usually the fast path, but not
always, and on a CPU without VNNI it can be far slower than f32:

- on a 2-core AVX2-only AMD EPYC (2 threads) a 256 x 256 x 256 product took 9.1 ms on ``_int_mm`` against 0.23 ms
  as an f32 GEMM, and the integer attention kernel ran the CIFAR UNet's attention 36x slower than the f32 chain it
  replaces (180.8 vs 5.1 ms);
- on a 2-core AMD EPYC with AVX-512 VNNI the kernel on ``_int_mm`` was 3x faster than on the f32 GEMM for one head
  of dimension 256 (1.46 vs 4.43 ms) but 1.3x slower for 32 heads of dimension 8 (23.2 vs 17.3 ms): ``_int_mm``
  takes one 2-D product per call, so small heads pay a call each where the f32 path makes one batched GEMM.

So the choice depends on the CPU *and* on the shape, and neither CPU flags nor one probe size predict it: callers
time both on the block they will run (:func:`faster_is_first`), once per shape.

An f32 GEMM gives the *same* integers whenever every partial sum is exact in f32: codes in [-128, 127] make each
product at most 2^14 in magnitude, so a dot product of at most :data:`EXACT_TERMS` = 2^24 / 2^14 = 1024 terms has
every partial sum an integer of magnitude <= 2^24, which f32 represents exactly, in any summation order. Longer
reductions are cut into pieces of that length, each converted to int32 and summed there. So the choice changes
speed only, never a number.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch

__all__ = ["EXACT_TERMS", "faster_is_first", "tracing_paused"]

EXACT_TERMS = 1 << 10
"""Longest dot product of int8 codes that an f32 GEMM computes exactly (2^24 / 128^2)."""

WARMUP_CALLS = 2
"""Untimed calls of each candidate first: oneDNN builds its kernels and TorchScript profiles on the first calls."""

TIMED_CALLS = 5
"""Timed calls of each candidate; the best of them counts (the least disturbed by the rest of the machine)."""


_set_tracing_state = torch._C._set_tracing_state  # type: ignore[attr-defined]  # in torch._C, not in its stubs


def _best_seconds(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@contextlib.contextmanager
def tracing_paused() -> Iterator[None]:
    """Run a measurement inside ``torch.jit.trace`` without recording it: the tracer is detached for the block and
    put back after (outside a trace this does nothing)."""
    state = torch._C._get_tracing_state()
    _set_tracing_state(None)
    try:
        yield
    finally:
        _set_tracing_state(state)


def faster_is_first(first: Callable[[], object], second: Callable[[], object]) -> bool:
    """True when ``first`` runs faster than ``second``: best of :data:`TIMED_CALLS` each, after
    :data:`WARMUP_CALLS` untimed calls each, without gradients and outside any trace in progress."""
    with torch.no_grad(), tracing_paused():
        for _ in range(WARMUP_CALLS):
            first(), second()
        return _best_seconds(first, TIMED_CALLS) < _best_seconds(second, TIMED_CALLS)
