"""Property tests of the quantization primitives at 2..8 bits, signed and unsigned."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdiff_ao.primitives import choose_qparams, dequantize, fake_quant, qrange, quantize
from tests.strategies import bits_and_range, float_tensors, fp_slack

# The primitives are cheap: run many more examples than the profile's default (>= 6,000 in this file).
MANY = settings(max_examples=1000)


@MANY
@given(x=float_tensors(), spec=bits_and_range(), symmetric=st.booleans())
def test_codes_in_range_and_integral(x: torch.Tensor, spec: tuple[int, bool, int, int], symmetric: bool) -> None:
    """quant_min <= q <= quant_max and q is an integer."""
    _, _, qmin, qmax = spec
    scale, zp = choose_qparams(x.min(), x.max(), qmin, qmax, symmetric)
    q = quantize(x, scale, zp, qmin, qmax)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert torch.equal(q, torch.round(q))


@MANY
@given(x=float_tensors(), spec=bits_and_range(), symmetric=st.booleans())
def test_round_trip_error_within_half_step(x: torch.Tensor, spec: tuple[int, bool, int, int], symmetric: bool) -> None:
    """|fq(x) - x| <= scale/2 + fp slack for x inside the observed range (choose_qparams never clips)."""
    _, _, qmin, qmax = spec
    scale, zp = choose_qparams(x.min(), x.max(), qmin, qmax, symmetric)
    err = (fake_quant(x, scale, zp, qmin, qmax) - x).abs().max()
    assert float(err) <= float(scale) / 2 + fp_slack(x) + 1e-30


@MANY
@given(x=float_tensors(), spec=bits_and_range(), symmetric=st.booleans())
def test_fake_quant_is_idempotent(x: torch.Tensor, spec: tuple[int, bool, int, int], symmetric: bool) -> None:
    """fq(fq(x)) == fq(x): grid points are fixed points."""
    _, _, qmin, qmax = spec
    scale, zp = choose_qparams(x.min(), x.max(), qmin, qmax, symmetric)
    y = fake_quant(x, scale, zp, qmin, qmax)
    assert torch.equal(fake_quant(y, scale, zp, qmin, qmax), y)


@MANY
@given(x=float_tensors(min_size=2), spec=bits_and_range(), symmetric=st.booleans())
def test_quantize_is_monotone(x: torch.Tensor, spec: tuple[int, bool, int, int], symmetric: bool) -> None:
    """x1 <= x2 implies q(x1) <= q(x2)."""
    _, _, qmin, qmax = spec
    scale, zp = choose_qparams(x.min(), x.max(), qmin, qmax, symmetric)
    xs, _ = torch.sort(x)
    q = quantize(xs, scale, zp, qmin, qmax)
    assert bool((q[1:] >= q[:-1]).all())


@MANY
@given(x=float_tensors(), spec=bits_and_range(), symmetric=st.booleans())
def test_zero_is_exact_and_qparams_valid(x: torch.Tensor, spec: tuple[int, bool, int, int], symmetric: bool) -> None:
    """dq(q(0)) == 0 exactly; scale > 0 and finite; zero_point an integer in range; signed symmetric => zp 0."""
    _, signed, qmin, qmax = spec
    scale, zp = choose_qparams(x.min(), x.max(), qmin, qmax, symmetric)
    assert float(scale) > 0 and bool(torch.isfinite(scale))
    assert qmin <= int(zp) <= qmax and zp.dtype == torch.int64
    if symmetric and signed:
        assert int(zp) == 0
    assert float(fake_quant(torch.zeros(1), scale, zp, qmin, qmax)) == 0.0


@MANY
@given(x=float_tensors(max_abs=100.0), spec=bits_and_range(), c=st.floats(0.01, 100.0))
def test_scale_equivariance(x: torch.Tensor, spec: tuple[int, bool, int, int], c: float) -> None:
    """scale(c x) == c scale(x) (up to fp rounding) for c > 0 when the range is not degenerate."""
    _, _, qmin, qmax = spec
    if float(x.abs().max()) < 1e-3:
        return
    s1, _ = choose_qparams(x.min(), x.max(), qmin, qmax)
    s2, _ = choose_qparams((c * x).min(), (c * x).max(), qmin, qmax)
    assert float(s2) == pytest.approx(c * float(s1), rel=1e-5)


def test_per_channel_broadcast_and_symmetric_4bit_never_emits_plus_8() -> None:
    """Per-channel qparams broadcast along ch_axis; 4-bit symmetric keeps max|w| at code 7, not 8."""
    w = torch.tensor([[1.0, -1.0, 0.6], [-4.0, 2.0, 0.0]])
    scale, zp = choose_qparams(w.amin(1), w.amax(1), -8, 7, symmetric=True)
    q = quantize(w, scale, zp, -8, 7, ch_axis=0)
    assert q.tolist() == [[7.0, -7.0, 4.0], [-8.0, 4.0, 0.0]]
    assert torch.allclose(dequantize(q, scale, zp, ch_axis=0)[1], torch.tensor([-4.0, 2.0, 0.0]))


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="bits"):
        qrange(0, signed=True)
    with pytest.raises(ValueError, match="quant_min"):
        choose_qparams(torch.tensor(0.0), torch.tensor(1.0), 5, 5)
    with pytest.raises(ValueError, match="no data"):
        choose_qparams(torch.tensor(float("inf")), torch.tensor(float("-inf")), 0, 255)
    with pytest.raises(ValueError, match="channels"):
        quantize(torch.zeros(2, 3), torch.ones(3), torch.zeros(3), 0, 255, ch_axis=0)
