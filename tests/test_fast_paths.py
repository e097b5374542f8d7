"""The no-gradient fast paths give the same bits as the paths they replace.

Sampler runs, calibration and the passes after reconstruction call the fake-quant simulation and the observers
thousands of times without gradients; these paths compute the same values in place (or from a cache). Each test
compares against the plain formula the fast path stands in for, exactly (``torch.equal``), not within a tolerance.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from qdiff_ao._compat import QConfig
from qdiff_ao.observers import RangeMinMaxObserver, histogram
from qdiff_ao.observers.histogram import pow2_bound, rebin_histogram, update_histogram
from qdiff_ao.primitives import check_finite
from qdiff_ao.quantizers.adaround import LearnedStepQuant
from qdiff_ao.quantizers.simulation import SimLayer, SimState, fake_quantize_in_place
from tests.strategies import float_tensors

_RANGES = st.sampled_from([(0, 255), (-128, 127), (0, 15), (-8, 7)])


def _near_half_steps(values: torch.Tensor, scale: float) -> torch.Tensor:
    """Values on and just beside the rounding boundaries (k + 1/2) * scale, where a different formula would round
    the other way, next to the drawn values."""
    k = torch.arange(-40, 40, dtype=torch.float32)
    half = (k + 0.5) * scale
    return torch.cat([values, half, torch.nextafter(half, half + 1), torch.nextafter(half, half - 1)])


@settings(deadline=None, max_examples=60)
@given(x=float_tensors(max_abs=50.0), scale=st.floats(1e-3, 2.0), zp=st.integers(-8, 200), bounds=_RANGES)
def test_learned_step_quant_without_gradient_is_the_gradient_path_bit_for_bit(
    x: torch.Tensor, scale: float, zp: int, bounds: tuple[int, int]
) -> None:
    lo, hi = bounds
    fq = LearnedStepQuant(torch.tensor(scale), torch.tensor(min(max(zp, lo), hi)), lo, hi)
    x = _near_half_steps(x, scale)
    with torch.no_grad():
        fast = fq(x)
    slow = fq(x.clone().requires_grad_(True))  # the straight-through path
    assert torch.equal(fast, slow.detach())


@settings(deadline=None, max_examples=60)
@given(x=float_tensors(max_abs=50.0), scale=st.floats(1e-3, 2.0), zp=st.integers(-8, 200), bounds=_RANGES)
def test_in_place_fake_quantize_is_torch_fake_quantize_bit_for_bit(
    x: torch.Tensor, scale: float, zp: int, bounds: tuple[int, int]
) -> None:
    lo, hi = bounds
    zp = min(max(zp, lo), hi)
    x = _near_half_steps(x, scale)
    expected = torch.fake_quantize_per_tensor_affine(x, scale, zp, lo, hi)
    assert torch.equal(fake_quantize_in_place(x, scale, zp, lo, hi), expected)


def _histogram_by_scatter(hist: torch.Tensor, bound: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The plain formula: bins floor((x + R) / width) counted with scatter_add, one pass, no chunks."""
    n = hist.shape[1]
    need = pow2_bound(rows.abs().amax(dim=1))
    new_bound = torch.where(bound > 0, torch.maximum(bound, need), need)
    hist = rebin_histogram(hist, bound, new_bound)
    width = 2.0 * new_bound / n
    idx = torch.floor((rows.double() + new_bound[:, None]) / width[:, None]).long().clamp_(0, n - 1)
    return hist.scatter_add(1, idx, torch.ones_like(idx, dtype=hist.dtype)), new_bound


@settings(deadline=None, max_examples=40)
@given(channels=st.integers(1, 4), width=st.integers(1, 300), batches=st.integers(1, 3), chunk=st.integers(1, 64),
       seed=st.integers(0, 2**16))
def test_chunked_histogram_counts_equal_one_scatter_pass(channels: int, width: int, batches: int, chunk: int,
                                                         seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    hist = torch.zeros(channels, 64, dtype=torch.float64)
    bound = torch.zeros(channels, dtype=torch.float64)
    ref_hist, ref_bound = hist.clone(), bound.clone()
    old_chunk = histogram._CHUNK
    histogram._CHUNK = chunk  # several chunks per call, down to one value per chunk
    try:
        for b in range(batches):
            rows = torch.randn(channels, width, generator=generator) * 10.0 ** (b - 1)
            hist, bound = update_histogram(hist, bound, rows)
            ref_hist, ref_bound = _histogram_by_scatter(ref_hist, ref_bound, rows)
    finally:
        histogram._CHUNK = old_chunk
    assert torch.equal(bound, ref_bound) and torch.equal(hist, ref_hist)


def test_cached_quantized_weight_follows_every_change_of_its_inputs() -> None:
    conv = nn.Conv2d(3, 4, 3)
    qconv = _quantized_layer(conv)
    x = torch.randn(2, 3, 8, 8)

    def expected() -> torch.Tensor:
        return conv._conv_forward(x, qconv.quant(conv.weight.detach()), conv.bias)

    with torch.no_grad():
        first = qconv.quantized_weight()
        assert qconv.quantized_weight() is first  # nothing changed: reused
        assert torch.equal(qconv(x), expected())
        conv.weight.mul_(1.7)  # in-place change of the float weight
        assert torch.equal(qconv(x), expected())
        qconv.quant.init_rounding(conv.weight)  # new rounding variables, same mode
        qconv.quant.set_mode("hard")
        assert torch.equal(qconv(x), expected())
        qconv.quant.v.neg_()  # an optimiser step changes V in place
        assert torch.equal(qconv(x), expected())
        qconv.quant.set_codes(torch.zeros_like(conv.weight, dtype=torch.int64))
        assert torch.equal(qconv(x), expected())
        qconv.quant.scale.mul_(2.0)
        assert torch.equal(qconv(x), expected())
    qconv.quant.set_mode("soft")  # training: gradients reach V through the quantized weight, never cached
    qconv.quant.init_rounding(conv.weight)
    qconv(x).sum().backward()
    assert qconv.quant.v.grad is not None and qconv._cached is None


def test_hard_rounding_weight_is_cached_while_step_sizes_train() -> None:
    """Reconstruction's step-size phase runs with gradients on: the hard W_hat stays one tensor until V moves."""
    conv = nn.Conv2d(3, 4, 3)
    qconv = _quantized_layer(conv)
    qconv.quant.init_rounding(conv.weight)
    qconv.quant.set_mode("hard")
    with torch.enable_grad():
        first = qconv.quantized_weight()
        assert qconv.quantized_weight() is first and not first.requires_grad
        with torch.no_grad():
            qconv.quant.v.neg_()  # an in-place change of V is seen
        moved = qconv.quantized_weight()
        assert moved is not first and not torch.equal(moved, first)
        qconv.quant.set_mode("soft")
        soft = qconv.quantized_weight()
        assert soft.requires_grad and qconv.quantized_weight() is not soft  # soft rounding under training: fresh


def _quantized_layer(conv: nn.Conv2d) -> SimLayer:
    """``conv`` as the simulation's quantized layer: 4-bit per-channel weights (qconfig as prepare sets it)."""
    weight_obs = RangeMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                               quant_min=-8, quant_max=7)
    conv.qconfig = QConfig(activation=RangeMinMaxObserver, weight=weight_obs)  # type: ignore[assignment]
    return SimLayer(conv, SimState())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_still_finds_every_non_finite_value(bad: float) -> None:
    x = torch.randn(1000)
    x[997] = bad
    with pytest.raises(ValueError, match="NaN/Inf"):
        check_finite(x, "test")
    check_finite(torch.randn(1000), "test")  # finite: silent
