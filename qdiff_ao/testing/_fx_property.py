"""The ``fx`` property: the observer works inside torch.ao's prepare_fx -> calibrate -> convert_fx flow.

The model (weights drawn by hypothesis, inputs calibrated per timestep)::

    x (N, 2, 2, 2) ─> conv 3x3, pad 1 (2 -> 3) ─> flatten ─> linear (12 -> 4) ─> y

The observer is the activation observer (``torch.quint8``, per tensor) and/or the weight observer
(``torch.qint8``, per tensor or per channel on axis 0) of a global ``QConfig``; the other role gets torch.ao's
8-bit min/max observer. After ``convert_fx``:

    * conv and linear are quantized modules (the observer's dtype/qscheme matched the backend config);
    * their weights' ``int_repr()`` lies in the weight observer's [quant_min, quant_max], and the weight qparams
      are the observer's own qparams for that weight;
    * every activation quantize node and every quantized module's output qparams are qparams of a calibrated
      observer, with zero_point in [quant_min, quant_max] and a finite scale > 0;
    * the converted model runs on the calibration batches and returns finite values.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn

from qdiff_ao._compat import (
    MinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    convert_fx,
    prepare_fx,
)
from qdiff_ao.observers.timestep_context import timestep_context
from qdiff_ao.testing._observer_properties import ObserverCase, ObserverTarget, _guard, build, raw_qparams
from qdiff_ao.testing.report import _Fail, fmt_tensor
from qdiff_ao.testing.strategies import QuantSettings, bit_widths, float_tensors

__all__: list[str] = []

# Inputs and weights of the float model stay below this magnitude M so that its activations cannot overflow
# float32 (the output is bounded by 12 * 18 * M**3 ~ 2e29); the other properties use the caller's max_abs.
_FX_MAX_ABS = 1e9


class _TinyNet(nn.Module):
    """x (N, 2, 2, 2) -> Conv2d(2, 3, 3, padding=1) -> flatten -> Linear(12, 4)."""

    def __init__(self, conv_weight: torch.Tensor, fc_weight: torch.Tensor) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(12, 4)
        with torch.no_grad():
            self.conv.weight.copy_(conv_weight)
            self.fc.weight.copy_(fc_weight)
            for bias in (self.conv.bias, self.fc.bias):
                if bias is not None:
                    bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


def roles(signed: bool | None, per_channel: bool) -> tuple[bool, bool]:
    """(as activation observer, as weight observer): activations are unsigned per-tensor, weights signed."""
    return (signed is not True and not per_channel, signed is not False)


def fx_cases(
    *, signed: bool | None, per_channel: bool, symmetric: bool | None, bits: tuple[int, int], max_abs: float, kinds: Any
) -> st.SearchStrategy[ObserverCase]:
    as_act, as_weight = roles(signed, per_channel)
    max_abs = min(max_abs, _FX_MAX_ABS)

    @st.composite
    def build_case(draw: st.DrawFn) -> ObserverCase:
        b = draw(bit_widths(*bits))
        sym = st.booleans() if symmetric is None else st.just(symmetric)
        act = QuantSettings(b, False, draw(sym), False) if as_act else None
        weight = QuantSettings(b, True, draw(sym), per_channel, 0 if per_channel else None) if as_weight else None
        n = draw(st.integers(1, 3))
        batches = [
            (draw(st.integers(0, 999)), draw(float_tensors((n, 2, 2, 2), max_abs=max_abs, kinds=kinds)))
            for _ in range(draw(st.integers(1, 3)))
        ]
        w_conv = draw(float_tensors((3, 2, 3, 3), max_abs=max_abs, kinds=kinds))
        w_fc = draw(float_tensors((4, 12), max_abs=max_abs, kinds=kinds))
        return ObserverCase(
            act or weight,  # type: ignore[arg-type]
            batches,
            {
                "activation observer": act,
                "weight observer": weight,
                "conv.weight": fmt_tensor(w_conv),
                "fc.weight": fmt_tensor(w_fc),
                "_weights": (w_conv, w_fc),
            },
        )

    return build_case()


def _factory(target: ObserverTarget, s: QuantSettings | None, default: Any) -> Any:
    if s is None:
        return default
    return functools.partial(target.factory, **s.observer_kwargs())


def prop_fx(target: ObserverTarget, case: ObserverCase, backend_config: Any) -> None:
    act, weight = case.extras["activation observer"], case.extras["weight observer"]
    w_conv, w_fc = case.extras["_weights"]
    qconfig = QConfig(
        activation=_factory(target, act, MinMaxObserver.with_args(dtype=torch.quint8)),
        weight=_factory(
            target, weight, PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        ),
    )
    model = _TinyNet(w_conv, w_fc).eval()
    example = (case.batches[0][1],)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        prepared = _guard(
            "prepare_fx",
            lambda: prepare_fx(model, QConfigMapping().set_global(qconfig), example, backend_config=backend_config),
        )
        with torch.no_grad():
            for t, x in case.batches:
                with timestep_context(t):
                    _guard(f"the prepared model at t={t}", prepared, x)
        observed = [raw_qparams(m) for _, m in prepared.named_modules() if isinstance(m, ObserverBase)]
        converted = _guard("convert_fx", lambda: convert_fx(prepared, backend_config=backend_config))
        _check_weights(target, converted, weight, {"conv": w_conv, "fc": w_fc})
        _check_activations(converted, act, observed)
        with torch.no_grad():
            for t, x in case.batches:
                y = _guard("the converted model", converted, x)
                if not bool(torch.isfinite(y).all()):
                    raise _Fail(f"the converted model returned non-finite values for the batch at t={t}")


def _check_weights(
    target: ObserverTarget, gm: torch.fx.GraphModule, s: QuantSettings | None, floats: dict[str, torch.Tensor]
) -> None:
    for name, w_float in floats.items():
        mod = gm.get_submodule(name)
        weight_fn = getattr(mod, "weight", None)  # quantized modules expose weight() as a method
        w = weight_fn() if callable(weight_fn) else None
        if not (isinstance(w, torch.Tensor) and w.is_quantized):
            raise _Fail(
                f"convert_fx left {name} unquantized ({type(mod).__name__}): the observer's dtype/qscheme did not "
                "match the backend config, so prepare_fx ignored the QConfig"
            )
        if s is None:
            continue
        codes = w.int_repr()
        if int(codes.min()) < s.quant_min or int(codes.max()) > s.quant_max:
            bad = codes[(codes < s.quant_min) | (codes > s.quant_max)]
            raise _Fail(
                f"converted {name}.weight has integer codes {sorted(set(bad.tolist()))[:8]} outside the weight "
                f"observer's [quant_min, quant_max] = [{s.quant_min}, {s.quant_max}]"
            )
        obs = build(target, s)
        _guard("weight observer", obs, w_float)
        scale, zp = raw_qparams(obs)
        if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            got_s, got_z = w.q_per_channel_scales(), w.q_per_channel_zero_points()
        else:
            got_s, got_z = torch.tensor([w.q_scale()]), torch.tensor([w.q_zero_point()])
        if not (
            torch.allclose(got_s.double(), scale.double(), rtol=1e-6, atol=0) and torch.equal(got_z.long(), zp.long())
        ):
            raise _Fail(
                f"converted {name}.weight has scale={fmt_tensor(got_s)}, zero_point={fmt_tensor(got_z)} but the "
                f"weight observer gives scale={fmt_tensor(scale)}, zero_point={fmt_tensor(zp)} for that weight"
            )


def _check_activations(
    gm: torch.fx.GraphModule, s: QuantSettings | None, observed: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    found: list[tuple[str, float, int]] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            scale, zp = (_attr(gm, a) for a in node.args[1:3])
            found.append((f"quantize node {node.name}", scale, zp))
    for name in ("conv", "fc"):
        mod = gm.get_submodule(name)
        out_scale, out_zp = getattr(mod, "scale", None), getattr(mod, "zero_point", None)
        if out_scale is not None and out_zp is not None:
            found.append((f"{name} output", float(out_scale), int(out_zp)))
    if not found:
        raise _Fail("convert_fx produced no activation quantization (no quantize_per_tensor node, no output qparams)")
    if s is None:
        return
    for where, scale, zp in found:
        if not (scale > 0 and scale == scale and scale != float("inf")) or not s.quant_min <= zp <= s.quant_max:
            raise _Fail(
                f"{where}: scale={scale:.9g}, zero_point={zp} violates scale > 0 finite, zero_point in "
                f"[{s.quant_min}, {s.quant_max}]"
            )
        if not any(
            o[0].numel() == 1 and abs(float(o[0]) - scale) <= 1e-6 * scale and int(o[1]) == zp for o in observed
        ):
            raise _Fail(f"{where}: scale={scale:.9g}, zero_point={zp} is not the qparams of any calibrated observer")


def _attr(gm: torch.fx.GraphModule, arg: Any) -> Any:
    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
        value = functools.reduce(getattr, str(arg.target).split("."), gm)
        return value.item() if isinstance(value, torch.Tensor) else value
    return arg
