"""Hypothesis strategies shared by the tests of primitives and observers."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


@st.composite
def float_tensors(draw: st.DrawFn, max_abs: float = 1e4, min_size: int = 1, max_size: int = 64) -> torch.Tensor:
    """1-d float32 tensors with magnitudes up to ``max_abs``, including constants and single outliers."""
    n = draw(st.integers(min_size, max_size))
    elements = st.floats(-max_abs, max_abs, allow_nan=False, allow_infinity=False, width=32)
    arr = draw(hnp.arrays(np.float32, n, elements=elements))
    return torch.from_numpy(arr.copy())


@st.composite
def bits_and_range(draw: st.DrawFn) -> tuple[int, bool, int, int]:
    """(bits, signed, quant_min, quant_max) for 2..8 bits."""
    bits = draw(st.integers(2, 8))
    signed = draw(st.booleans())
    if signed:
        return bits, signed, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return bits, signed, 0, 2**bits - 1


def fp_slack(x: torch.Tensor) -> float:
    """Floating-point slack proportional to eps * max|x| (fp32 rounding of x / scale and back)."""
    return 8 * float(torch.finfo(torch.float32).eps) * float(x.abs().max()) if x.numel() else 0.0
