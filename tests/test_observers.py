"""Property tests of the observers at 2..8 bits, plus behaviour specific to each observer."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from qdiff_ao._compat import ObserverBase
from qdiff_ao.observers import (
    EMAMinMaxObserver,
    LpObserver,
    PerChannelLpObserver,
    RangeMinMaxObserver,
    SoftmaxObserver,
    TimestepAwareObserver,
    get_observer,
    list_observers,
    register_observer,
    timestep_context,
    unregister_observer,
)
from qdiff_ao.primitives import fake_quant, quantize
from tests.strategies import bits_and_range, float_tensors, fp_slack


def _make(kind: str, qmin: int, qmax: int, symmetric: bool) -> ObserverBase:
    dtype = torch.qint8 if qmin < 0 else torch.quint8
    if kind == "per_channel_lp":
        qs = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        return PerChannelLpObserver(dtype=dtype, qscheme=qs, quant_min=qmin, quant_max=qmax)
    qs = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
    cls: dict[str, Callable[..., ObserverBase]] = {
        "minmax": RangeMinMaxObserver,
        "ema": EMAMinMaxObserver,
        "lp": LpObserver,
        "timestep": lambda **kw: TimestepAwareObserver(base=LpObserver(**kw)),
    }
    return cls[kind](dtype=dtype, qscheme=qs, quant_min=qmin, quant_max=qmax)


KINDS = ["minmax", "ema", "lp", "per_channel_lp", "timestep"]
ORDER_INVARIANT = ["minmax", "lp", "per_channel_lp", "timestep"]


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(2, -1) if x.numel() % 2 == 0 else torch.cat([x, x]).reshape(2, -1)


@pytest.mark.parametrize("kind", KINDS)
@given(x=float_tensors(min_size=2), spec=bits_and_range(), symmetric=st.booleans())
def test_observer_qparams_codes_and_round_trip(kind: str, x: torch.Tensor, spec: tuple, symmetric: bool) -> None:
    """Valid qparams; codes in range; |fq(x)-x| <= s/2 + slack inside the chosen range; fq idempotent; 0 exact."""
    _, signed, qmin, qmax = spec
    obs = _make(kind, qmin, qmax, symmetric)
    x2 = _as_2d(x)
    assert obs(x2) is x2
    scale, zp = obs.calculate_qparams()
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
    assert bool(((zp >= qmin) & (zp <= qmax)).all())
    if symmetric and signed:
        assert bool((zp == 0).all())
    axis = 0 if kind == "per_channel_lp" else None
    q = quantize(x2, scale, zp, qmin, qmax, ch_axis=axis)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax and torch.equal(q, q.round())
    y = fake_quant(x2, scale, zp, qmin, qmax, ch_axis=axis)
    assert torch.equal(fake_quant(y, scale, zp, qmin, qmax, ch_axis=axis), y)
    # Inside the representable interval [(qmin - zp) s, (qmax - zp) s] the error is at most half a step.
    s = scale.reshape(-1, 1) if axis == 0 else scale
    z = zp.reshape(-1, 1) if axis == 0 else zp
    inside = (x2 >= (qmin - z) * s) & (x2 <= (qmax - z) * s)
    err = (y - x2).abs()
    assert bool((err[inside] <= (s / 2 + fp_slack(x2)).expand_as(x2)[inside]).all())
    assert bool((fake_quant(torch.zeros_like(x2), scale, zp, qmin, qmax, ch_axis=axis) == 0).all())


@pytest.mark.parametrize("kind", ORDER_INVARIANT)
@given(batches=st.lists(float_tensors(min_size=2, max_abs=1e3), min_size=2, max_size=4), spec=bits_and_range())
def test_batch_order_does_not_change_qparams(kind: str, batches: list, spec: tuple) -> None:
    """Observers that claim it give identical qparams for any order of the calibration batches."""
    _, _, qmin, qmax = spec
    a, b = _make(kind, qmin, qmax, False), _make(kind, qmin, qmax, False)
    for x in batches:
        a(_as_2d(x))
    for x in reversed(batches):
        b(_as_2d(x))
    for pa, pb in zip(a.calculate_qparams(), b.calculate_qparams()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("kind", KINDS)
@given(x=float_tensors(min_size=2), spec=bits_and_range())
def test_state_dict_round_trip_and_empty_input(kind: str, x: torch.Tensor, spec: tuple) -> None:
    """A fresh observer loading the state_dict gives identical qparams; an empty batch changes nothing."""
    _, _, qmin, qmax = spec
    obs = _make(kind, qmin, qmax, False)
    obs(_as_2d(x))
    before = obs.calculate_qparams()
    empty = torch.empty(2, 0)
    assert obs(empty) is empty
    fresh = _make(kind, qmin, qmax, False)
    fresh.load_state_dict(obs.state_dict())
    for p0, p1, p2 in zip(before, obs.calculate_qparams(), fresh.calculate_qparams()):
        assert torch.equal(p0, p1) and torch.equal(p0, p2)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_raise_clear_error(kind: str, bad: float) -> None:
    obs = _make(kind, 0, 255, False)
    with pytest.raises(ValueError, match="NaN/Inf"):
        obs(torch.tensor([[1.0, bad], [0.0, 2.0]]))


def test_unobserved_observer_refuses_qparams() -> None:
    with pytest.raises(RuntimeError, match="no data"):
        LpObserver().calculate_qparams()


def test_integer_input_is_refused() -> None:
    with pytest.raises(TypeError, match="integer-valued"):
        LpObserver()(torch.arange(4))


def _exact_lp_ratio(x: torch.Tensor, qmin: int, qmax: int, p: float) -> float:
    """Brute-force Q-Diffusion search on the raw values (the reference's per-batch loop)."""
    from qdiff_ao.primitives import choose_qparams

    best, best_r = float("inf"), 1.0
    for i in range(80):
        r = 1 - 0.01 * i
        s, z = choose_qparams(x.min() * r, x.max() * r, qmin, qmax)
        e = float((x - fake_quant(x, s, z, qmin, qmax)).abs().pow(p).sum())
        if e < best:
            best, best_r = e, r
    return best_r


@pytest.mark.parametrize("bits", [4, 8])
def test_lp_histogram_search_matches_brute_force(bits: int) -> None:
    """The histogram-based search picks (nearly) the clipping ratio a search on the raw values picks."""
    torch.manual_seed(0)
    x = torch.randn(20_000) * torch.rand(20_000).pow(3) * 3  # heavy tails, like post-SiLU activations
    qmin, qmax = 0, 2**bits - 1
    obs = LpObserver(quant_min=qmin, quant_max=qmax)
    for chunk in x.split(5000):
        obs(chunk)
    ratio, _, _ = obs.search()
    assert float(ratio) == pytest.approx(_exact_lp_ratio(x, qmin, qmax, 2.4), abs=0.021)


def test_lp_beats_minmax_in_lp_error_at_4_bits() -> None:
    torch.manual_seed(1)
    w = torch.randn(16, 64) * torch.linspace(0.1, 2, 16)[:, None]
    w[:, 0] *= 6  # one outlier per channel
    lp = PerChannelLpObserver(quant_min=-8, quant_max=7)
    mm = RangeMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-8, quant_max=7)
    lp(w)
    mm(w)
    errs = []
    for obs in (lp, mm):
        s, z = obs.calculate_qparams()
        errs.append(float((w - fake_quant(w, s, z, -8, 7, ch_axis=0)).abs().pow(2.4).sum()))
    assert errs[0] < errs[1]


def test_ema_follows_q_diffusion_running_stat() -> None:
    obs = EMAMinMaxObserver(momentum=0.9)
    obs(torch.tensor([-1.0, 1.0]))
    obs(torch.tensor([-3.0, 5.0]))
    assert float(obs.min_val) == pytest.approx(0.9 * -1 + 0.1 * -3)
    assert float(obs.max_val) == pytest.approx(0.9 * 1 + 0.1 * 5)


@given(p=st.lists(st.floats(0, 1, width=32), min_size=1, max_size=32), bits=st.sampled_from([8, 16]))
def test_softmax_observer_is_unsigned_with_zero_point_zero(p: list, bits: int) -> None:
    x = torch.tensor(p)
    obs = SoftmaxObserver(bits=bits)
    obs(x)
    scale, zp = obs.calculate_qparams()
    assert int(zp) == 0 and obs.quant_min == 0 and obs.quant_max == 2**bits - 1
    y = fake_quant(x, scale, zp, 0, 2**bits - 1)
    assert float((y - x).abs().max()) <= float(scale) / 2 + fp_slack(x)


def test_softmax_observer_refuses_negative_values_and_bad_bits() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        SoftmaxObserver()(torch.tensor([-0.1, 0.5]))
    with pytest.raises(ValueError, match="8 or 16"):
        SoftmaxObserver(bits=4)
    with pytest.raises(ValueError, match="affine"):
        SoftmaxObserver(qscheme=torch.per_tensor_symmetric)


def test_timestep_observer_records_per_step_ranges_and_shares_qparams() -> None:
    obs = TimestepAwareObserver(base=RangeMinMaxObserver)
    for t, scale in ((999, 4.0), (500, 2.0), (1, 0.5), (999, 1.0)):
        with timestep_context(t):
            obs(torch.tensor([-scale, scale]))
    assert obs.per_step_ranges() == {1: (-0.5, 0.5), 500: (-2.0, 2.0), 999: (-4.0, 4.0)}
    ref = RangeMinMaxObserver()
    ref(torch.tensor([-4.0, 4.0]))
    for a, b in zip(obs.calculate_qparams(), ref.calculate_qparams()):
        assert torch.equal(a, b)
    fresh = TimestepAwareObserver(base=RangeMinMaxObserver)
    fresh.load_state_dict(obs.state_dict())
    assert fresh.per_step_ranges() == obs.per_step_ranges()


def test_registry_round_trip_and_duplicates() -> None:
    assert {"lp", "minmax", "ema", "softmax", "timestep", "lp_per_channel"} <= set(list_observers())

    @register_observer("test_only_minmax")
    class Mine(RangeMinMaxObserver):
        pass

    try:
        assert get_observer("test_only_minmax") is Mine
        with pytest.raises(ValueError, match="already registered"):
            register_observer("test_only_minmax")(Mine)
    finally:
        unregister_observer("test_only_minmax")
    with pytest.raises(KeyError, match="registered"):
        get_observer("test_only_minmax")
    with pytest.raises(TypeError, match="ObserverBase"):
        register_observer("not_an_observer")(int)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="container"):
        LpObserver(dtype=torch.quint8, quant_min=-1, quant_max=10)
    with pytest.raises(ValueError, match="qscheme"):
        LpObserver(qscheme=torch.per_channel_symmetric)
    with pytest.raises(ValueError, match="dtype"):
        LpObserver(dtype=torch.float16)
    with pytest.raises(ValueError, match="momentum"):
        EMAMinMaxObserver(momentum=1.0)
