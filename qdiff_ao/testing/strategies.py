"""Hypothesis strategies for quantization property tests: tensors with hard values, bit widths, qschemes, batches.

Everything is small on purpose (at most 48 elements per tensor, at most 4 batches) so that one example costs
about a millisecond and a property can afford hundreds of examples.

Tensor *kinds* (``TENSOR_KINDS``) aim at the inputs that break quantizers:

    uniform      floats in [-max_abs, max_abs]
    mixed_signs  uniform, with at least one value < 0 and one > 0
    positive     all > 0                    negative     all < 0
    constant     one value repeated (max == min: the scale must not collapse to 0)
    zeros        0.0 and -0.0 only
    outlier      values within max_abs/1000, except one value of magnitude in [max_abs/2, max_abs]
    subnormal    float32 subnormals (and zeros): |x| < 2**-126
    grid         small multiples of a power of two (exact halves: rounding ties)

Example:
    >>> from hypothesis import given, settings
    >>> @settings(max_examples=5, derandomize=True, database=None)
    ... @given(x=float_tensors((2, 3), max_abs=10.0))
    ... def check(x):
    ...     assert x.shape == (2, 3) and bool(x.abs().max() <= 10.0)
    >>> check()
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qdiff_ao.primitives import qrange

__all__ = [
    "TENSOR_KINDS",
    "QuantSettings",
    "shapes",
    "float_tensors",
    "bit_widths",
    "quant_ranges",
    "quant_settings",
    "per_channel_shapes",
    "calibration_batches",
    "timestep_batches",
]

TENSOR_KINDS: tuple[str, ...] = (
    "uniform",
    "mixed_signs",
    "positive",
    "negative",
    "constant",
    "zeros",
    "outlier",
    "subnormal",
    "grid",
)

_SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)  # 2**-126


@dataclass(frozen=True)
class QuantSettings:
    """One drawn quantizer configuration, in torch.ao's words.

    Attributes:
        bits: code width b; the range is ``qrange(b, signed)``.
        signed: signed codes (``torch.qint8`` container) or unsigned (``torch.quint8``).
        symmetric: symmetric qscheme (zero point fixed) or affine.
        per_channel: per-channel qparams along ``ch_axis``.
        ch_axis: the channel axis (None for per-tensor).
    """

    bits: int
    signed: bool
    symmetric: bool
    per_channel: bool
    ch_axis: int | None = None

    @property
    def quant_min(self) -> int:
        return qrange(self.bits, self.signed)[0]

    @property
    def quant_max(self) -> int:
        return qrange(self.bits, self.signed)[1]

    @property
    def dtype(self) -> torch.dtype:
        return torch.qint8 if self.signed else torch.quint8

    @property
    def qscheme(self) -> torch.qscheme:
        if self.per_channel:
            return torch.per_channel_symmetric if self.symmetric else torch.per_channel_affine
        return torch.per_tensor_symmetric if self.symmetric else torch.per_tensor_affine

    def observer_kwargs(self) -> dict[str, Any]:
        """The torch.ao observer keyword arguments: dtype, qscheme, quant_min, quant_max (and ch_axis)."""
        kwargs: dict[str, Any] = dict(
            dtype=self.dtype, qscheme=self.qscheme, quant_min=self.quant_min, quant_max=self.quant_max
        )
        if self.per_channel:
            kwargs["ch_axis"] = self.ch_axis
        return kwargs

    def describe(self) -> str:
        """One line: ``bits=4 signed=False ... -> dtype=torch.quint8, qscheme=..., quant_min=0, quant_max=15``."""
        kwargs = ", ".join(f"{k}={v}" for k, v in self.observer_kwargs().items())
        flags = f"bits={self.bits} signed={self.signed} symmetric={self.symmetric} per_channel={self.per_channel}"
        return f"{flags} ({kwargs})"


def shapes(
    *, min_dims: int = 1, max_dims: int = 4, min_side: int = 1, max_side: int = 4, max_numel: int = 48
) -> st.SearchStrategy[tuple[int, ...]]:
    """Tensor shapes with ``min_dims..max_dims`` dims, sides in ``min_side..max_side`` and at most ``max_numel``."""
    if not 0 <= min_dims <= max_dims:
        raise ValueError(f"need 0 <= min_dims <= max_dims, got min_dims={min_dims}, max_dims={max_dims}")
    if not 1 <= min_side <= max_side:
        raise ValueError(f"need 1 <= min_side <= max_side, got min_side={min_side}, max_side={max_side}")
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side).filter(
        lambda s: int(np.prod(s)) <= max_numel
    )


def _f32(value: float) -> float:
    """The float32 value nearest ``value``, as a Python float (hypothesis wants exactly representable bounds)."""
    return float(np.float32(value))


def _elements(lo: float, hi: float, **kw: Any) -> st.SearchStrategy[float]:
    return st.floats(_f32(lo), _f32(hi), width=32, allow_nan=False, allow_infinity=False, **kw)


@st.composite
def _tensor_of_kind(draw: st.DrawFn, shape: tuple[int, ...], kind: str, max_abs: float) -> np.ndarray:
    n = int(np.prod(shape))
    if kind == "uniform":
        arr = draw(hnp.arrays(np.float32, shape, elements=_elements(-max_abs, max_abs)))
    elif kind == "mixed_signs":
        arr = np.abs(draw(hnp.arrays(np.float32, shape, elements=_elements(0.0, max_abs))))
        signs = draw(hnp.arrays(np.bool_, shape))
        arr = np.where(signs, -arr, arr)
        if n >= 2:
            flat = arr.reshape(-1)
            flat[0] = -abs(draw(_elements(_SMALLEST_NORMAL, max_abs)))
            flat[-1] = abs(draw(_elements(_SMALLEST_NORMAL, max_abs)))
    elif kind == "positive":
        arr = draw(hnp.arrays(np.float32, shape, elements=_elements(0.0, max_abs, exclude_min=True)))
    elif kind == "negative":
        arr = draw(hnp.arrays(np.float32, shape, elements=_elements(-max_abs, 0.0, exclude_max=True)))
    elif kind == "constant":
        arr = np.full(shape, draw(_elements(-max_abs, max_abs)), dtype=np.float32)
    elif kind == "zeros":
        arr = draw(hnp.arrays(np.float32, shape, elements=st.sampled_from([0.0, -0.0])))
    elif kind == "outlier":
        small = max_abs / 1000.0
        arr = draw(hnp.arrays(np.float32, shape, elements=_elements(-small, small)))
        big = draw(_elements(max_abs / 2, max_abs)) * draw(st.sampled_from([1.0, -1.0]))
        arr.reshape(-1)[draw(st.integers(0, n - 1))] = big
    elif kind == "subnormal":
        arr = draw(hnp.arrays(np.float32, shape, elements=_elements(-_SMALLEST_NORMAL, _SMALLEST_NORMAL)))
    elif kind == "grid":
        exponent = draw(st.integers(-8, int(np.floor(np.log2(max(max_abs, 1.0)))) - 4))
        ints = draw(hnp.arrays(np.int32, shape, elements=st.integers(-16, 16)))
        arr = np.clip(ints.astype(np.float32) * np.float32(2.0**exponent), -max_abs, max_abs).astype(np.float32)
    else:  # validated by float_tensors
        raise AssertionError(kind)
    return np.ascontiguousarray(arr, dtype=np.float32)


@st.composite
def float_tensors(
    draw: st.DrawFn,
    shape: Sequence[int] | st.SearchStrategy[tuple[int, ...]] | None = None,
    *,
    max_abs: float = 1e4,
    kinds: Collection[str] | None = None,
    nonnegative: bool = False,
) -> torch.Tensor:
    """float32 tensors of a given or drawn shape with |x| <= ``max_abs``, drawn from the ``TENSOR_KINDS``.

    Args:
        shape: a fixed shape, a strategy of shapes, or None for ``shapes()``.
        max_abs: the largest magnitude generated (> 0).
        kinds: the kinds to draw from (default: all ``TENSOR_KINDS``).
        nonnegative: take |x| of every value (for observers of non-negative data, e.g. softmax outputs).

    Raises:
        ValueError: for an unknown kind or ``max_abs <= 0``.
    """
    chosen = _check_kinds(kinds)
    if not max_abs > 0:
        raise ValueError(f"max_abs must be > 0, got {max_abs}")
    if shape is None:
        shape = shapes()
    dims = tuple(draw(shape)) if isinstance(shape, st.SearchStrategy) else tuple(int(s) for s in shape)
    arr = draw(_tensor_of_kind(dims, draw(st.sampled_from(chosen)), max_abs))
    x = torch.from_numpy(arr.copy())
    return x.abs() if nonnegative else x


def _check_kinds(kinds: Collection[str] | None) -> tuple[str, ...]:
    if kinds is None:
        return TENSOR_KINDS
    chosen = tuple(kinds)
    unknown = [k for k in chosen if k not in TENSOR_KINDS]
    if unknown or not chosen:
        raise ValueError(f"kinds must be a non-empty subset of {TENSOR_KINDS}, got {chosen!r}")
    return chosen


def bit_widths(min_bits: int = 2, max_bits: int = 8) -> st.SearchStrategy[int]:
    """Code widths in ``min_bits..max_bits`` (default 2..8, the int8-container widths)."""
    if not 1 <= min_bits <= max_bits <= 8:
        raise ValueError(f"need 1 <= min_bits <= max_bits <= 8, got {min_bits}..{max_bits}")
    return st.integers(min_bits, max_bits)


def _bools(fixed: bool | None) -> st.SearchStrategy[bool]:
    return st.booleans() if fixed is None else st.just(bool(fixed))


def quant_ranges(
    bits: int | st.SearchStrategy[int] | None = None, signed: bool | None = None
) -> st.SearchStrategy[tuple[int, int]]:
    """(quant_min, quant_max) = ``qrange(bits, signed)``; None draws bits from ``bit_widths()`` / both signs."""
    bits_st = bit_widths() if bits is None else (bits if isinstance(bits, st.SearchStrategy) else st.just(bits))
    return st.builds(qrange, bits_st, _bools(signed))


def quant_settings(
    *,
    signed: bool | None = None,
    symmetric: bool | None = None,
    per_channel: bool | None = False,
    bits: tuple[int, int] = (2, 8),
    ndim: int = 1,
) -> st.SearchStrategy[QuantSettings]:
    """Quantizer configurations; None draws both values of a flag. ``ch_axis`` is drawn in ``0..ndim-1``."""
    if ndim < 1:
        raise ValueError(f"ndim must be >= 1 (per-channel settings need a channel axis), got {ndim}")

    @st.composite
    def build(draw: st.DrawFn) -> QuantSettings:
        pc = draw(_bools(per_channel))
        return QuantSettings(
            bits=draw(bit_widths(*bits)),
            signed=draw(_bools(signed)),
            symmetric=draw(_bools(symmetric)),
            per_channel=pc,
            ch_axis=draw(st.integers(0, ndim - 1)) if pc else None,
        )

    return build()


@st.composite
def per_channel_shapes(draw: st.DrawFn, max_numel: int = 48) -> tuple[tuple[int, ...], int]:
    """(shape, ch_axis) with ``shape[ch_axis] >= 1`` and at most ``max_numel`` elements."""
    shape = draw(shapes(max_numel=max_numel))
    return shape, draw(st.integers(0, len(shape) - 1))


def calibration_batches(
    shape: Sequence[int] | st.SearchStrategy[tuple[int, ...]] | None = None,
    *,
    min_batches: int = 1,
    max_batches: int = 4,
    max_abs: float = 1e4,
    kinds: Collection[str] | None = None,
    nonnegative: bool = False,
) -> st.SearchStrategy[list[torch.Tensor]]:
    """Lists of calibration batches sharing one shape; each batch draws its own kind (one may hold an outlier)."""
    if not 1 <= min_batches <= max_batches:
        raise ValueError(f"need 1 <= min_batches <= max_batches, got {min_batches}..{max_batches}")
    _check_kinds(kinds)

    @st.composite
    def build(draw: st.DrawFn) -> list[torch.Tensor]:
        dims = draw(shape) if isinstance(shape, st.SearchStrategy) else (draw(shapes()) if shape is None else shape)
        n = draw(st.integers(min_batches, max_batches))
        return [
            draw(float_tensors(tuple(dims), max_abs=max_abs, kinds=kinds, nonnegative=nonnegative)) for _ in range(n)
        ]

    return build()


def timestep_batches(
    shape: Sequence[int] | st.SearchStrategy[tuple[int, ...]] | None = None,
    *,
    min_batches: int = 1,
    max_batches: int = 4,
    max_abs: float = 1e4,
    kinds: Collection[str] | None = None,
    nonnegative: bool = False,
    num_train_timesteps: int = 1000,
) -> st.SearchStrategy[list[tuple[int, torch.Tensor]]]:
    """Calibration batches split across diffusion timesteps: ``[(t, x), ...]`` with t in [0, num_train_timesteps).

    Timesteps may repeat (several batches per step) and come in any order, as a sampler's trajectory can be
    shuffled by a calibration loader. Feed each batch inside ``qdiff_ao.timestep_context(t)``.
    """
    batches = calibration_batches(
        shape, min_batches=min_batches, max_batches=max_batches, max_abs=max_abs, kinds=kinds, nonnegative=nonnegative
    )

    @st.composite
    def build(draw: st.DrawFn) -> list[tuple[int, torch.Tensor]]:
        xs = draw(batches)
        ts = draw(st.lists(st.integers(0, num_train_timesteps - 1), min_size=len(xs), max_size=len(xs)))
        return list(zip(ts, xs))

    return build()
