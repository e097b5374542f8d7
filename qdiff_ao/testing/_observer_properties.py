"""Observer properties: what any torch.ao ``ObserverBase`` must satisfy, one function per property.

Each function receives an ``ObserverCase`` (a drawn quantizer configuration plus calibration batches, fed inside
``timestep_context(t)``) and raises ``_Fail`` with a readable counterexample when the property does not hold.
The grid properties (range, round_trip, idempotence, monotonicity, zero) apply the observer's qparams with the
reference ``qdiff_ao.primitives.fake_quant``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException

from qdiff_ao.observers.timestep_context import timestep_context
from qdiff_ao.primitives import fake_quant
from qdiff_ao.testing._fq_properties import FQ_CHECKS, Grid
from qdiff_ao.testing.report import _Fail, fmt_tensor
from qdiff_ao.testing.strategies import QuantSettings, quant_settings, shapes, timestep_batches

__all__: list[str] = []

_EPS32 = float(torch.finfo(torch.float32).eps)

# The integer range of each quantized container (what torch.quantize_per_tensor clamps to).
CONTAINERS: dict[torch.dtype, tuple[int, int]] = {
    torch.quint8: (0, 255),
    torch.qint8: (-128, 127),
    torch.qint32: (-(2**31), 2**31 - 1),
}


@dataclass
class ObserverCase:
    """One example: quantizer settings, calibration batches [(t, x)], and property-specific draws."""

    settings: QuantSettings
    batches: list[tuple[int, torch.Tensor]]
    extras: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [] if "activation observer" in self.extras else [f"settings: {self.settings.describe()}"]
        for key, value in self.extras.items():
            if not key.startswith("_"):
                shown = "not under test" if value is None else value
                lines.append(f"{key}: {shown.describe() if isinstance(shown, QuantSettings) else shown}")
        lines.append(f"{len(self.batches)} calibration batch(es):")
        lines += [f"  t={t}: {fmt_tensor(x)}" for t, x in self.batches]
        return "\n".join(lines)


@dataclass
class ObserverTarget:
    """The observer under test and how to treat it."""

    factory: Callable[..., Any]
    name: str
    clips: bool


def observer_cases(
    *,
    signed: bool | None,
    per_channel: bool,
    symmetric: bool | None,
    bits: tuple[int, int],
    max_abs: float,
    kinds: Any,
    nonnegative: bool,
    min_batches: int = 1,
) -> st.SearchStrategy[ObserverCase]:
    # Per-channel tensors have >= 2 dims (weights): torch.ao's PerChannelMinMaxObserver rejects 1-d input.
    shape_st = shapes(min_dims=2 if per_channel else 1)

    @st.composite
    def build(draw: st.DrawFn) -> ObserverCase:
        shape = draw(shape_st)
        settings = draw(
            quant_settings(signed=signed, symmetric=symmetric, per_channel=per_channel, bits=bits, ndim=len(shape))
        )
        batches = draw(
            timestep_batches(shape, min_batches=min_batches, max_abs=max_abs, kinds=kinds, nonnegative=nonnegative)
        )
        return ObserverCase(settings, batches)

    return build()


def _guard(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """Call fn(*args) (observer code); turn any error into a property failure that says which call raised."""
    try:
        return fn(*args)
    except (_Fail, HypothesisException):
        raise
    except Exception as err:
        raise _Fail(f"{what} raised {type(err).__name__}: {err}") from err


def build(target: ObserverTarget, settings: QuantSettings) -> Any:
    kwargs = settings.observer_kwargs()
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return _guard(f"observer_factory({args})", lambda: target.factory(**kwargs))


def feed(obs: Any, batches: list[tuple[int, torch.Tensor]]) -> None:
    """Calibrate: obs(x) inside timestep_context(t); forward must return x and leave it untouched."""
    for t, x in batches:
        before = x.clone()
        with timestep_context(t):
            out = _guard(f"observer.forward(x) at t={t}", obs, x)
        same = isinstance(out, torch.Tensor) and out.shape == x.shape and torch.equal(out, before)
        if not same or not torch.equal(x, before):
            raise _Fail(
                f"observer.forward(x) must return x unchanged and must not modify it in place; for x = "
                f"{fmt_tensor(before)} it returned {fmt_tensor(out) if isinstance(out, torch.Tensor) else repr(out)}"
            )


def raw_qparams(obs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    out = _guard("observer.calculate_qparams()", obs.calculate_qparams)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise _Fail(f"calculate_qparams() must return (scale, zero_point), got {out!r}")
    scale, zp = (torch.as_tensor(v).detach().reshape(-1) for v in out)
    return scale, zp


def grid_of(obs: Any, case: ObserverCase) -> Grid:
    """The observer's qparams as a Grid over the case's tensors, using the reference fake quant."""
    s = case.settings
    scale, zp = raw_qparams(obs)
    channels = case.batches[0][1].shape[s.ch_axis] if s.per_channel and s.ch_axis is not None else 1
    if scale.numel() != channels or zp.numel() != channels:
        raise _Fail(
            f"calculate_qparams() returned {scale.numel()} scale(s) and {zp.numel()} zero point(s); expected "
            f"{channels} ({'per channel along ch_axis=' + str(s.ch_axis) if s.per_channel else 'per tensor'})"
        )
    scale32, zp64 = scale.float(), zp.double()
    ch_axis = s.ch_axis if s.per_channel else None
    qmin, qmax = s.quant_min, s.quant_max
    return Grid(scale32, zp64, qmin, qmax, ch_axis, lambda x: fake_quant(x, scale32, zp64, qmin, qmax, ch_axis))


def calibrated(target: ObserverTarget, case: ObserverCase) -> tuple[Any, Grid]:
    obs = build(target, case.settings)
    feed(obs, case.batches)
    return obs, grid_of(obs, case)


def all_values(case: ObserverCase) -> torch.Tensor:
    """All calibration values stacked as one tensor (batch index first; channels stay on ch_axis + 1)."""
    return torch.stack([x for _, x in case.batches])


def _shift(grid: Grid) -> Grid:
    """The same grid over stacked batches (the channel axis moves one to the right)."""
    if grid.ch_axis is None:
        return grid
    axis = grid.ch_axis + 1
    return Grid(
        grid.scale,
        grid.zero_point,
        grid.quant_min,
        grid.quant_max,
        axis,
        lambda x: fake_quant(x, grid.scale, grid.zero_point, grid.quant_min, grid.quant_max, axis),
    )


def prop_qparams(target: ObserverTarget, case: ObserverCase) -> None:
    s = case.settings
    _, grid = calibrated(target, case)
    scale, zp = grid.scale.double(), grid.zero_point
    problems = []
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        problems.append("scale must be finite and > 0")
    if not bool((torch.isfinite(zp) & (zp == zp.round())).all()):
        problems.append("zero_point must be an integer")
    elif not bool(((zp >= s.quant_min) & (zp <= s.quant_max)).all()):
        problems.append(f"zero_point must lie in [quant_min, quant_max] = [{s.quant_min}, {s.quant_max}]")
    if s.symmetric and s.signed and not bool((zp == 0).all()):
        problems.append("a symmetric signed qscheme needs zero_point == 0")
    if problems:
        raise _Fail(f"{'; '.join(problems)}\n{grid.describe()}")


def prop_range(target: ObserverTarget, case: ObserverCase) -> None:
    s = case.settings
    obs, grid = calibrated(target, case)
    declared = (getattr(obs, "quant_min", None), getattr(obs, "quant_max", None))
    if declared != (s.quant_min, s.quant_max):
        raise _Fail(
            f"the observer was built with quant_min={s.quant_min}, quant_max={s.quant_max} but declares "
            f"quant_min={declared[0]}, quant_max={declared[1]} (convert_fx uses the declared range)"
        )
    dtype = getattr(obs, "dtype", None)
    container = CONTAINERS.get(dtype) if isinstance(dtype, torch.dtype) else None
    if container is not None and not container[0] <= s.quant_min < s.quant_max <= container[1]:
        raise _Fail(f"[quant_min, quant_max] does not fit the {dtype} container {list(container)}")
    values, grid = all_values(case), _shift(grid)
    FQ_CHECKS["range"](grid, values, "codes of the calibration data")
    if target.clips:
        return
    # A non-clipping observer must cover what it saw: every observed x has a code within half a step of the range.
    xr = grid.rows(values)
    steps = xr / grid.s64
    codes = steps + grid.z64
    tol = 8 * _EPS32 * (steps.abs() + grid.z64.abs() + 1)  # the float32 scale is rounded: relative error eps
    bad = ~((codes >= s.quant_min - 0.5 - tol) & (codes <= s.quant_max + 0.5 + tol))
    if bool(bad.any()):
        c, i = (int(v) for v in bad.nonzero()[0])
        chan = f" (channel {c})" if grid.ch_axis is not None else ""
        raise _Fail(
            f"observed value{chan} x={xr[c, i].item():.9g} gets code x/scale + zero_point = {codes[c, i].item():.9g}, "
            f"more than half a step outside [quant_min, quant_max] = [{s.quant_min}, {s.quant_max}] (it would be "
            f"clipped although the observer saw it; pass clips=True if the observer clips by design)\n{grid.describe()}"
        )


def _grid_property(name: str) -> Callable[[ObserverTarget, ObserverCase], None]:
    def prop(target: ObserverTarget, case: ObserverCase) -> None:
        _, grid = calibrated(target, case)
        FQ_CHECKS[name](_shift(grid), all_values(case), "fake quant with the observer's qparams (reference primitives)")

    return prop


def _same_qparams(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor], exact: bool) -> bool:
    """Equal qparams (NaN equals NaN: garbage qparams are the ``qparams`` property's business, not this one's)."""
    if a[0].shape != b[0].shape or a[1].shape != b[1].shape:
        return False
    rtol = 0.0 if exact else 1e-5
    return all(
        bool(torch.allclose(x.double(), y.double(), rtol=r, atol=0, equal_nan=True))
        for x, y, r in ((a[0], b[0], rtol), (a[1], b[1], 0.0))
    )


def _qp(q: tuple[torch.Tensor, torch.Tensor]) -> str:
    return f"scale={fmt_tensor(q[0])}, zero_point={fmt_tensor(q[1])}"


def prop_order_invariance(target: ObserverTarget, case: ObserverCase) -> None:
    perm = case.extras["permutation"]
    first = build(target, case.settings)
    feed(first, case.batches)
    second = build(target, case.settings)
    feed(second, [case.batches[i] for i in perm])
    qa, qb = raw_qparams(first), raw_qparams(second)
    if not _same_qparams(qa, qb, exact=False):
        raise _Fail(f"batches in the drawn order give {_qp(qa)}\nreordered by {perm} they give {_qp(qb)}")


def prop_state_dict(target: ObserverTarget, case: ObserverCase) -> None:
    obs = build(target, case.settings)
    feed(obs, case.batches)
    buf = io.BytesIO()
    _guard("torch.save(observer.state_dict())", lambda: torch.save(obs.state_dict(), buf))
    buf.seek(0)
    state = _guard("torch.load(..., weights_only=True)", lambda: torch.load(buf, weights_only=True))
    fresh = build(target, case.settings)
    _guard("fresh_observer.load_state_dict(state)", lambda: fresh.load_state_dict(state))
    qa = raw_qparams(obs)
    try:
        qb = raw_qparams(fresh)
    except _Fail as fail:
        raise _Fail(
            f"the calibrated observer gives {_qp(qa)}, but on a fresh observer after load_state_dict: "
            f"{fail.detail}\nstate_dict keys: {sorted(state)} (statistics must be registered buffers)"
        ) from fail
    if not _same_qparams(qa, qb, exact=True):
        raise _Fail(
            f"saved observer: {_qp(qa)}\nfresh observer after load_state_dict: {_qp(qb)}\n"
            f"state_dict keys: {sorted(state)} (statistics must be registered buffers)"
        )
    feed(obs, case.batches[-1:])
    feed(fresh, case.batches[-1:])
    qa, qb = raw_qparams(obs), raw_qparams(fresh)
    if not _same_qparams(qa, qb, exact=True):
        raise _Fail(
            f"after one more batch the saved observer gives {_qp(qa)} but the reloaded one {_qp(qb)}\n"
            f"state_dict keys: {sorted(state)} (some statistic is missing from the state_dict)"
        )


def _empty_like(case: ObserverCase) -> torch.Tensor:
    shape = list(case.batches[0][1].shape)
    axes = [a for a in range(len(shape)) if a != case.settings.ch_axis] or [0]
    shape[axes[0]] = 0
    return torch.empty(shape)


def prop_empty_input(target: ObserverTarget, case: ObserverCase) -> None:
    empty = _empty_like(case)
    t0 = case.batches[0][0]
    early = build(target, case.settings)
    feed(early, [(t0, empty)])  # before any data: must not raise
    feed(early, case.batches)
    obs = build(target, case.settings)
    feed(obs, case.batches)
    before = raw_qparams(obs)
    feed(obs, [(t0, empty)])
    after, first = raw_qparams(obs), raw_qparams(early)
    if not _same_qparams(before, after, exact=True):
        raise _Fail(f"empty input {tuple(empty.shape)} changed the qparams from {_qp(before)} to {_qp(after)}")
    if not _same_qparams(before, first, exact=True):
        raise _Fail(
            f"an empty first batch {tuple(empty.shape)} changed the qparams: {_qp(first)} instead of {_qp(before)}"
        )


def prop_non_finite(target: ObserverTarget, case: ObserverCase) -> None:
    b, pos, value = case.extras["bad_batch"], case.extras["bad_index"], case.extras["bad_value"]
    batches = [(t, x.clone()) for t, x in case.batches]
    batches[b][1].view(-1)[pos % batches[b][1].numel()] = value
    obs = build(target, case.settings)
    try:
        for t, x in batches:
            with timestep_context(t):
                obs(x)
        result = obs.calculate_qparams()
    except ValueError:
        return
    except Exception as err:
        raise _Fail(f"a {value} in batch {b} raised {type(err).__name__} ({err}); expected ValueError") from err
    raise _Fail(f"a {value} in batch {b} was accepted silently; calculate_qparams() then returned {result!r}")


OBSERVER_PROPS: dict[str, Callable[[ObserverTarget, ObserverCase], None]] = {
    "qparams": prop_qparams,
    "range": prop_range,
    "round_trip": _grid_property("round_trip"),
    "idempotence": _grid_property("idempotence"),
    "monotonicity": _grid_property("monotonicity"),
    "zero": _grid_property("zero"),
    "order_invariance": prop_order_invariance,
    "state_dict": prop_state_dict,
    "empty_input": prop_empty_input,
    "non_finite": prop_non_finite,
}
