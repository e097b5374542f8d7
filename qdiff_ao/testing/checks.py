"""``check_observer`` and ``check_fake_quant``: run the standard quantization property suite with hypothesis.

Observer properties (``OBSERVER_PROPERTIES``, in the order they run):

    qparams           scale > 0 and finite; zero_point an integer in [quant_min, quant_max]; symmetric signed
                      => zero_point == 0
    range             the observer declares the [quant_min, quant_max] it was built with, inside its dtype's
                      container; codes clamp(round(x/s) + z) are integers in range; unless ``clips=True``, every
                      observed x has x/s + z within half a step of [quant_min, quant_max] (nothing seen is clipped)
    round_trip        |fq(x) - x| <= s/2 + 8 eps max|x| inside the representable range [(qmin - z) s, (qmax - z) s]
    idempotence       fq(fq(x)) == fq(x)
    monotonicity      x1 <= x2 => fq(x1) <= fq(x2)
    zero              fq(0) == 0 exactly
    order_invariance  permuting the calibration batches leaves the qparams unchanged (switch off with
                      ``order_invariant=False`` for order-dependent observers such as EMA)
    state_dict        torch.save/load of state_dict into a fresh observer gives identical qparams, now and after
                      one more batch
    empty_input       empty tensors are returned unchanged and leave the qparams untouched (also as first batch)
    non_finite        NaN or +-Inf input raises ValueError (torch.ao's own observers don't: skip it with a reason)
    fx                prepare_fx / calibrate / convert_fx on a tiny Conv2d + Linear model (see ``_fx_property``)

Observers are built as ``observer_factory(dtype=..., qscheme=..., quant_min=..., quant_max=...[, ch_axis=...])``
with drawn settings: bits 2..8, ``torch.quint8`` (unsigned) or ``torch.qint8`` (signed) containers, affine or
symmetric; wrap other constructors in a lambda. Calibration batches are fed inside ``timestep_context(t)``.

Example:
    >>> from qdiff_ao._compat import MinMaxObserver
    >>> report = check_observer(MinMaxObserver, max_examples=5, skip={
    ...     "non_finite": "torch.ao's MinMaxObserver accepts NaN silently", "fx": "keep the doctest fast"})
    >>> report.ran[:3], report.total_examples >= 5 * 9
    (['qparams', 'range', 'round_trip'], True)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from qdiff_ao._compat import ObserverBase
from qdiff_ao.primitives import choose_qparams
from qdiff_ao.qconfig import get_backend_config
from qdiff_ao.testing import _fx_property
from qdiff_ao.testing._fq_properties import FQ_CHECKS, Grid
from qdiff_ao.testing._observer_properties import OBSERVER_PROPS, ObserverCase, ObserverTarget, observer_cases
from qdiff_ao.testing.report import PropertyReport, PropertyViolation, Violation, _count_example, _Fail, fmt_tensor
from qdiff_ao.testing.strategies import QuantSettings, float_tensors, quant_settings, shapes

__all__ = ["OBSERVER_PROPERTIES", "FAKE_QUANT_PROPERTIES", "EXPLANATIONS", "check_observer", "check_fake_quant"]

logger = logging.getLogger(__name__)

OBSERVER_PROPERTIES: tuple[str, ...] = (*OBSERVER_PROPS, "fx")
FAKE_QUANT_PROPERTIES: tuple[str, ...] = tuple(FQ_CHECKS)

EXPLANATIONS: dict[str, str] = {
    "qparams": "scale must be finite and > 0, zero_point an integer in [quant_min, quant_max] (0 for symmetric "
    "signed qschemes)",
    "range": "integer codes must stay within [quant_min, quant_max]; a non-clipping observer must not clip values "
    "it has observed (codes may reach at most half a step beyond the range)",
    "round_trip": "for x inside the representable range, |fq(x) - x| must be at most scale/2 (plus float32 slack "
    "8*eps*max|x|)",
    "idempotence": "fake-quantizing a fake-quantized value must return it unchanged: fq(fq(x)) == fq(x)",
    "monotonicity": "quantization must preserve order: x1 <= x2 implies fq(x1) <= fq(x2)",
    "zero": "0.0 must be exactly representable: fq(0) == 0",
    "order_invariance": "the order of the calibration batches must not change the qparams",
    "state_dict": "saving the observer's state_dict and loading it into a fresh observer must reproduce its qparams",
    "empty_input": "an empty tensor must be returned unchanged and must not change the qparams",
    "non_finite": "NaN or Inf input must raise a ValueError instead of producing garbage qparams",
    "fx": "the observer must work in prepare_fx / convert_fx: quantized weights' codes within [quant_min, quant_max] "
    "and activation qparams taken from the calibrated observer",
}

_UNSETTABLE = (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much)


def _validate(known: tuple[str, ...], skip: Mapping[str, str] | None, properties: Collection[str] | None) -> None:
    for name in list(skip or {}) + list(properties or []):
        if name not in known:
            raise ValueError(f"unknown property {name!r}; known properties: {', '.join(known)}")
    for name, reason in (skip or {}).items():
        if not isinstance(reason, str) or not reason.strip():
            raise ValueError(f"skip[{name!r}] needs a reason (a non-empty string), got {reason!r}")


def _settings(settings: hyp_settings | None, max_examples: int | None) -> hyp_settings:
    parent = settings if settings is not None else hyp_settings(deadline=None)
    phases = tuple(p for p in parent.phases if p is not Phase.explain)
    kwargs: dict[str, Any] = dict(
        report_multiple_bugs=False,
        phases=phases,
        suppress_health_check=tuple(set(parent.suppress_health_check) | set(_UNSETTABLE)),
    )
    if max_examples is not None:
        if max_examples < 1:
            raise ValueError(f"max_examples must be >= 1, got {max_examples}")
        kwargs["max_examples"] = max_examples
    return hyp_settings(parent, **kwargs)


def _find_fail(err: BaseException) -> _Fail | None:
    if isinstance(err, _Fail):
        return err
    for sub in getattr(err, "exceptions", ()):
        found = _find_fail(sub)
        if found is not None:
            return found
    return None


def _run(
    report: PropertyReport,
    name: str,
    strategy: st.SearchStrategy[Any],
    body: Callable[[Any], None],
    settings: hyp_settings,
    describe: Callable[[Any], str],
) -> None:
    report.ran.append(name)
    report.examples[name] = 0

    def test(case: Any) -> None:
        report.examples[name] += 1
        _count_example()
        try:
            body(case)
        except _Fail as fail:
            raise _Fail(f"{describe(case)}\n{fail.detail}") from fail

    start = time.perf_counter()
    try:
        given(case=strategy)(settings(test))()
    except Exception as err:
        fail = _find_fail(err)
        if fail is None:
            raise
        report.violations.append(Violation(name, EXPLANATIONS[name], fail.detail))
    finally:
        report.seconds[name] = time.perf_counter() - start


def _finish(report: PropertyReport) -> PropertyReport:
    logger.debug("%s", report.summary())
    if report.violations:
        raise PropertyViolation(report.target, report.violations, report)
    return report


def _probe(factory: Callable[..., Any], name: str, per_channel: bool | None) -> bool:
    """Check the factory builds an ObserverBase; infer per_channel from a default instance if not given."""
    if per_channel is not None:
        return per_channel
    try:
        obs = factory()
    except Exception as err:
        raise ValueError(
            f"could not infer per_channel: {name}() raised {type(err).__name__}: {err}; pass per_channel=True/False"
        ) from err
    if not isinstance(obs, ObserverBase):
        raise TypeError(f"observer_factory must build a torch.ao ObserverBase, {name}() gave {type(obs).__name__}")
    return getattr(obs, "qscheme", None) in (torch.per_channel_affine, torch.per_channel_symmetric)


def check_observer(
    observer_factory: Callable[..., Any],
    *,
    signed: bool | None = None,
    per_channel: bool | None = None,
    symmetric: bool | None = None,
    bits: tuple[int, int] = (2, 8),
    order_invariant: bool = True,
    clips: bool = False,
    nonnegative: bool = False,
    skip: Mapping[str, str] | None = None,
    properties: Collection[str] | None = None,
    max_examples: int | None = None,
    fx_max_examples: int | None = None,
    settings: hyp_settings | None = None,
    max_abs: float = 1e4,
    kinds: Collection[str] | None = None,
    backend_config: Any = None,
    name: str | None = None,
) -> PropertyReport:
    """Property-test an observer (any torch.ao ``ObserverBase`` with ``calculate_qparams``).

    Args:
        observer_factory: called as ``observer_factory(dtype=, qscheme=, quant_min=, quant_max=[, ch_axis=])``.
        signed: only signed (True) / unsigned (False) code ranges; None draws both.
        per_channel: per-channel observer (qparams along a drawn ``ch_axis``); None infers it from
            ``observer_factory()``'s qscheme.
        symmetric: only symmetric / affine qschemes; None draws both.
        bits: the range of code widths drawn.
        order_invariant: False skips ``order_invariance`` (observers that depend on batch order by design).
        clips: the observer clips outliers by design (percentile, Lp search): ``range`` then does not require
            observed values to be representable.
        nonnegative: generate only values >= 0 (observers of softmax outputs); ``fx`` is then skipped.
        skip: property -> reason, for properties to switch off. Unknown names raise ValueError.
        properties: run only these properties (default: all).
        max_examples: hypothesis examples per property (default: the active hypothesis profile's).
        fx_max_examples: examples for ``fx`` (default: max(1, max_examples // 10)), which is ~100x slower.
        settings: hypothesis settings to start from (default: the active profile with deadline=None).
        max_abs: the largest magnitude of generated values.
        kinds: tensor kinds to draw (see ``strategies.TENSOR_KINDS``).
        backend_config: BackendConfig for ``fx`` (default: ``qdiff_ao.get_backend_config()``).
        name: the observer's name in messages.

    Returns:
        A ``PropertyReport`` (properties run and skipped, examples per property).

    Raises:
        PropertyViolation: naming each violated property with hypothesis' minimal counterexample.
        ValueError: for an unknown property name, a skip without a reason, or bad settings.
    """
    _validate(OBSERVER_PROPERTIES, skip, properties)
    name = name or getattr(observer_factory, "__qualname__", None) or repr(observer_factory)
    pc = _probe(observer_factory, name, per_channel)
    base = _settings(settings, max_examples)
    report = PropertyReport(target=name)
    auto: dict[str, str] = {}
    if not order_invariant:
        auto["order_invariance"] = "order_invariant=False: the observer depends on batch order by design"
    if nonnegative:
        auto["fx"] = "nonnegative=True: the tiny conv/linear model produces negative activations"
    elif not any(_fx_property.roles(signed, pc)):
        auto["fx"] = "no fx role: activation observers are unsigned per-tensor, weight observers signed"
    target = ObserverTarget(observer_factory, name, clips)
    common: dict[str, Any] = dict(
        signed=signed, per_channel=pc, symmetric=symmetric, bits=bits, max_abs=max_abs, kinds=kinds
    )
    cases = observer_cases(nonnegative=nonnegative, **common)
    for prop in OBSERVER_PROPERTIES:
        if properties is not None and prop not in properties:
            continue
        reason = (skip or {}).get(prop) or auto.get(prop)
        if reason:
            report.skipped[prop] = reason
            continue
        strategy, settings_p = cases, base
        if prop == "order_invariance":
            strategy = observer_cases(nonnegative=nonnegative, min_batches=2, **common).flatmap(_with_permutation)
        elif prop == "non_finite":
            strategy = cases.flatmap(_with_bad_value)
        elif prop == "fx":
            strategy = _fx_property.fx_cases(**common)
            n = fx_max_examples or max(1, base.max_examples // 10)
            settings_p = hyp_settings(base, max_examples=n)
        body = _bind(prop, target, backend_config)
        _run(report, prop, strategy, body, settings_p, lambda c: c.describe())
    return _finish(report)


def _bind(prop: str, target: ObserverTarget, backend_config: Any) -> Callable[[ObserverCase], None]:
    if prop == "fx":
        if backend_config is None:
            backend_config = get_backend_config()
        return lambda case: _fx_property.prop_fx(target, case, backend_config)
    fn = OBSERVER_PROPS[prop]
    return lambda case: fn(target, case)


def _with_permutation(case: ObserverCase) -> st.SearchStrategy[ObserverCase]:
    n = len(case.batches)
    perms = st.permutations(range(n)).map(lambda p: list(p) if list(p) != list(range(n)) else list(range(n))[::-1])
    return perms.map(lambda p: ObserverCase(case.settings, case.batches, {"permutation": p}))


def _with_bad_value(case: ObserverCase) -> st.SearchStrategy[ObserverCase]:
    return st.builds(
        lambda b, i, v: ObserverCase(case.settings, case.batches, {"bad_batch": b, "bad_index": i, "bad_value": v}),
        st.integers(0, len(case.batches) - 1),
        st.integers(0, 47),
        st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    )


class _FqCase:
    """One fake-quant example: settings, input x, and the qparams under test."""

    def __init__(
        self, settings: QuantSettings, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, clip: float
    ) -> None:
        self.settings, self.x, self.scale, self.zero_point, self.clip = settings, x, scale, zero_point, clip

    def describe(self) -> str:
        return (
            f"settings: {self.settings.describe()}\nx: {fmt_tensor(self.x)}\n"
            f"qparams: choose_qparams on {self.clip:g} x the range of x"
        )


def _fq_cases(
    signed: bool | None,
    per_channel: bool | None,
    symmetric: bool | None,
    bits: tuple[int, int],
    max_abs: float,
    kinds: Collection[str] | None,
) -> st.SearchStrategy[_FqCase]:
    @st.composite
    def build(draw: st.DrawFn) -> _FqCase:
        shape = draw(shapes())
        s = draw(
            quant_settings(signed=signed, symmetric=symmetric, per_channel=per_channel, bits=bits, ndim=len(shape))
        )
        x = draw(float_tensors(shape, max_abs=max_abs, kinds=kinds))
        clip = draw(st.sampled_from([1.0, 1.0, 0.5, 0.1]))  # 1.0: qparams cover x; < 1: x is partly clipped
        axis = s.ch_axis if s.per_channel else None
        rows = x.reshape(1, -1) if axis is None else x.movedim(axis, 0).reshape(x.shape[axis], -1)
        lo, hi = rows.min(dim=1).values * clip, rows.max(dim=1).values * clip
        scale, zp = choose_qparams(lo, hi, s.quant_min, s.quant_max, symmetric=s.symmetric)
        if not s.per_channel:
            scale, zp = scale.reshape(()), zp.reshape(())
        return _FqCase(s, x, scale, zp, clip)

    return build()


def check_fake_quant(
    fake_quant_fn: Callable[..., torch.Tensor],
    *,
    signed: bool | None = None,
    per_channel: bool | None = None,
    symmetric: bool | None = None,
    bits: tuple[int, int] = (2, 8),
    skip: Mapping[str, str] | None = None,
    properties: Collection[str] | None = None,
    max_examples: int | None = None,
    settings: hyp_settings | None = None,
    max_abs: float = 1e4,
    kinds: Collection[str] | None = None,
    name: str | None = None,
) -> PropertyReport:
    """Property-test a fake-quant function ``fake_quant_fn(x, scale, zero_point, quant_min, quant_max, ch_axis)``.

    Per tensor, scale and zero_point are 0-d tensors (float32, int64) and ch_axis is None; per channel they are
    1-d along ``ch_axis``. Qparams come from ``choose_qparams`` on the drawn input's range, sometimes shrunk so
    that part of the input is clipped. Properties: ``FAKE_QUANT_PROPERTIES`` (range, round_trip, idempotence,
    monotonicity, zero; see ``_fq_properties``).

    Args:
        fake_quant_fn: the function under test.
        signed, per_channel, symmetric: restrict the drawn settings (None draws both).
        bits, skip, properties, max_examples, settings, max_abs, kinds, name: as in :func:`check_observer`.

    Returns:
        A ``PropertyReport``.

    Raises:
        PropertyViolation: naming each violated property with hypothesis' minimal counterexample.
        ValueError: for an unknown property name or a skip without a reason.
    """
    _validate(FAKE_QUANT_PROPERTIES, skip, properties)
    name = name or getattr(fake_quant_fn, "__qualname__", None) or repr(fake_quant_fn)
    base = _settings(settings, max_examples)
    report = PropertyReport(target=name)
    cases = _fq_cases(signed, per_channel, symmetric, bits, max_abs, kinds)
    for prop in FAKE_QUANT_PROPERTIES:
        if properties is not None and prop not in properties:
            continue
        if (skip or {}).get(prop):
            report.skipped[prop] = (skip or {})[prop]
            continue

        def body(case: _FqCase, prop: str = prop) -> None:
            s = case.settings
            ch_axis = s.ch_axis if s.per_channel else None

            def fq(x: torch.Tensor) -> torch.Tensor:
                return fake_quant_fn(x, case.scale, case.zero_point, s.quant_min, s.quant_max, ch_axis)

            grid = Grid(
                case.scale.float().reshape(-1),
                case.zero_point.double().reshape(-1),
                s.quant_min,
                s.quant_max,
                ch_axis,
                fq,
            )
            try:
                FQ_CHECKS[prop](grid, case.x, f"{name} on the drawn input")
            except _Fail:
                raise
            except Exception as err:
                raise _Fail(f"{name} raised {type(err).__name__}: {err}") from err

        _run(report, prop, cases, body, base, lambda c: c.describe())
    return _finish(report)
