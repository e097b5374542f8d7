"""Removal of ``x / 1``, ``x * 1`` and ``1 * x`` from lowered graphs (``qdiff_ao.deploy.identity_ops``): exact on
every float value, kept where it is not an identity (integer operands) or not safe (in-place neighbours), and on
converted diffusers UNets the same outputs bit for bit."""

from __future__ import annotations

import operator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx

import qdiff_ao
from qdiff_ao.deploy.freezing import freeze_graph
from qdiff_ao.deploy.identity_ops import without_identity_arithmetic
from tests.unet_factory import calibrated_unet, unet_inputs


def _count(gm: fx.GraphModule, target: object) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


class _Arithmetic(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x / 1.0) * 1 + 1.0 * (x / 1)


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
       values=st.lists(st.sampled_from([0.0, -0.0, 1.5, -3.25, 1e-30, 6e4, float("inf"), float("-inf"), float("nan")])
                       | st.floats(width=16), min_size=1, max_size=8))
def test_float_identities_are_removed_and_outputs_stay_bit_identical(dtype: torch.dtype, values: list[float]) -> None:
    x = torch.tensor(values, dtype=dtype)
    gm = fx.symbolic_trace(_Arithmetic())
    out = without_identity_arithmetic(gm, {"x": x})
    assert _count(out, operator.truediv) == 0 and _count(out, operator.mul) == 0
    assert _count(gm, operator.truediv) == 2 and _count(gm, operator.mul) == 2  # the input graph is unchanged
    bits = {torch.float16: torch.int16, torch.float32: torch.int32, torch.float64: torch.int64}[dtype]
    expected, got = gm(x), out(x)
    assert torch.equal(expected.view(bits), got.view(bits))  # bit for bit, NaN payloads and -0 included


class _IntegerDivision(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.long() / 1 + x / 1.0


def test_integer_operands_keep_their_division() -> None:
    x = torch.tensor([1.0, 2.0, -3.0])
    gm = fx.symbolic_trace(_IntegerDivision())
    out = without_identity_arithmetic(gm, {"x": x})
    kept = [n for n in out.graph.nodes if n.target is operator.truediv]
    assert len(kept) == 1 and kept[0].args[0].target == "long"  # long / 1 makes a float tensor: not an identity
    assert out(x).dtype == torch.float32 and torch.equal(out(x), gm(x))


class _InPlaceUser(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x / 1.0
        y.add_(1.0)  # without the division this would write into x
        return x + y


def test_division_feeding_an_in_place_op_is_kept() -> None:
    x = torch.tensor([1.0, 2.0])
    gm = fx.symbolic_trace(_InPlaceUser())
    out = without_identity_arithmetic(gm, {"x": x})
    assert _count(out, operator.truediv) == 1
    assert torch.equal(out(x.clone()), torch.tensor([3.0, 5.0]))


def test_missing_example_input_is_named() -> None:
    gm = fx.symbolic_trace(_Arithmetic())
    with pytest.raises(ValueError, match=r"missing \['x'\]"):
        without_identity_arithmetic(gm, {"y": torch.ones(1)})


@pytest.mark.parametrize("family", ["attn", "cross_attn"])
def test_converted_unet_loses_its_scale_factor_divisions_and_nothing_else(family: str) -> None:
    _, prepared = calibrated_unet(family, qdiff_ao.QuantConfig())
    converted = qdiff_ao.convert(prepared)
    before = _count(converted, operator.truediv)
    assert before > 0  # diffusers' output_scale_factor / rescale_output_factor (1.0) on the residual sums
    out = without_identity_arithmetic(converted, unet_inputs(family, 2))
    assert _count(out, operator.truediv) < before
    assert len(out.graph.nodes) == len(converted.graph.nodes) - (before - _count(out, operator.truediv)) \
        - (_count(converted, operator.mul) - _count(out, operator.mul))
    inputs = unet_inputs(family, 3, t=250, seed=7)  # another batch size and timestep than the example
    with torch.no_grad():
        assert torch.equal(out(**inputs), converted(**inputs))


def test_frozen_quantized_unet_runs_without_the_divisions() -> None:
    unet, prepared = calibrated_unet("attn", qdiff_ao.QuantConfig())
    converted = qdiff_ao.convert(prepared)
    qunet = qdiff_ao.QuantizedUNet(converted, like=unet)
    example, inputs = unet_inputs("attn", 2), unet_inputs("attn", 3, t=300, seed=3)
    with torch.no_grad():
        eager = qunet(**inputs).sample
        qunet.optimize_for_inference(example, integer_attention=False)
        assert torch.equal(qunet(**inputs).sample, eager)
        divisions = [str(freeze_graph(gm, example).graph).count("aten::div(")
                     for gm in (converted, without_identity_arithmetic(converted, example))]
    assert divisions[1] < divisions[0]
