"""Tests of passes.correct_output_bias: the mean quantization error of the model output is folded into a bias."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

import qdiff_ao
from qdiff_ao._compat import prepare_fx
from qdiff_ao.passes.bias_correction import correct_output_bias, find_output_layer
from tests.unet_factory import build_unet, unet_inputs


def _calib(family: str, rows: int = 16) -> qdiff_ao.CalibrationSet:
    a, b = unet_inputs(family, rows // 2, t=900, seed=1), unet_inputs(family, rows // 2, t=100, seed=2)
    extra = {}
    if "encoder_hidden_states" in a:
        extra["encoder_hidden_states"] = torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]])
    if "class_labels" in a:
        extra["class_labels"] = torch.cat([a["class_labels"], b["class_labels"]])
    return qdiff_ao.CalibrationSet(torch.cat([a["sample"], b["sample"]]), torch.cat([a["timestep"], b["timestep"]]),
                                   **extra)


def _prepared(
    family: str, cfg: qdiff_ao.QuantConfig
) -> tuple[nn.Module, torch.fx.GraphModule, qdiff_ao.CalibrationSet]:
    unet = build_unet(family)
    calib = _calib(family)
    prepared = qdiff_ao.prepare(unet, cfg, calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    return unet, prepared, calib


@torch.no_grad()
def _converted_output_bias(unet: nn.Module, prepared: torch.fx.GraphModule, calib: qdiff_ao.CalibrationSet) -> float:
    """Mean of (quantized - float) model output over the calibration rows, with real int8 kernels."""
    quantized = qdiff_ao.convert(copy.deepcopy(prepared))
    diffs = []
    for _, inputs in calib.batches(8):
        out = quantized(**inputs)
        out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        diffs.append(out - unet(**inputs).sample)
    return float(torch.cat(diffs).mean())


def _correct(prepared: torch.fx.GraphModule, calib: Any, unet: nn.Module, **kwargs: Any) -> Any:
    """correct_output_bias, returning the report it stored in the graph info (the pass returns the graph)."""
    assert correct_output_bias(prepared, calib, unet, **kwargs) is prepared
    return qdiff_ao.graph_info(prepared).bias_correction


@pytest.mark.parametrize("family", ["attn", "cross_attn"])
def test_correction_removes_the_mean_output_error(family: str) -> None:
    unet, prepared, calib = _prepared(family, qdiff_ao.QuantConfig(weight_bits=4, act_bits=8))
    bias_before = prepared.conv_out.bias.detach().clone()
    mean_before = _converted_output_bias(unet, prepared, calib)
    report = _correct(prepared, calib, unet)
    assert report["layer"] == "conv_out" and report["quantizer"] is not None
    correction = torch.tensor(report["correction"])
    assert correction.shape == (unet.config.out_channels,)
    torch.testing.assert_close(prepared.conv_out.bias.detach(), bias_before - correction)
    assert qdiff_ao.graph_info(prepared).bias_correction is report  # the pass returns the graph, report inside
    # What is left after the correction is rounding at the output quantizer: far below what was removed.
    again = _correct(prepared, calib, unet)
    assert torch.tensor(again["correction"]).abs().max() <= 0.2 * correction.abs().max() + 1e-4
    mean_after = _converted_output_bias(unet, prepared, calib)
    assert abs(mean_after) < abs(mean_before) and abs(mean_after) < 0.5 * abs(mean_before) + 1e-4


def test_named_layer_is_measured_after_its_output_quantizer() -> None:
    unet, prepared, calib = _prepared("attn", qdiff_ao.QuantConfig(weight_bits=4, act_bits=8))
    found = find_output_layer(prepared)
    auto = _correct(copy.deepcopy(prepared), calib, unet)
    named = _correct(prepared, calib, unet, layer="conv_out")
    assert (named["layer"], named["quantizer"]) == found == (auto["layer"], auto["quantizer"])
    assert named["correction"] == auto["correction"]


def test_fourier_output_rescale_is_walked_through() -> None:
    unet, prepared, calib = _prepared("skip_fourier", qdiff_ao.QuantConfig(weight_bits=4, act_bits=8))
    layer, quantizer = find_output_layer(prepared)
    assert layer == "conv_out" and quantizer is not None


def test_weights_only_has_no_output_quantizer() -> None:
    unet, prepared, calib = _prepared("attn", qdiff_ao.QuantConfig(weight_bits=4, act_bits=None))
    report = _correct(prepared, calib, unet)
    assert report["layer"] == "conv_out" and report["quantizer"] is None
    again = _correct(prepared, calib, unet)
    # Without an output quantizer the correction is exact up to float summation.
    assert torch.tensor(again["correction"]).abs().max() < 1e-5


def test_errors_are_clear() -> None:
    unet, prepared, calib = _prepared("attn", qdiff_ao.QuantConfig(weight_bits=4, act_bits=8))
    with pytest.raises(ValueError, match="model has no module 'conv_out'"):
        correct_output_bias(prepared, calib, nn.Sequential())
    with pytest.raises(ValueError, match="not a quantized Conv2d/Linear"):
        correct_output_bias(prepared, calib, unet, layer="conv_norm_out")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        correct_output_bias(prepared, calib, unet, batch_size=0)
    with pytest.raises(TypeError, match="CalibrationSet"):
        correct_output_bias(prepared, {"sample": 1}, unet)  # type: ignore[arg-type]
    uncalibrated = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(), calib.example_inputs(2))
    with pytest.raises(ValueError, match="calibrate"):
        correct_output_bias(uncalibrated, calib, unet)


def test_no_quantized_output_layer_is_refused() -> None:
    class Scale(nn.Module):
        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            return sample * 2

    cfg = qdiff_ao.QuantConfig()
    gm = prepare_fx(Scale(), qdiff_ao.get_qconfig_mapping(cfg), (torch.randn(1, 2),),
                    backend_config=qdiff_ao.get_backend_config(cfg))
    with pytest.raises(ValueError, match="found no quantized Conv2d/Linear producing the model output"):
        find_output_layer(gm)


def test_recipe_applies_an_output_correction_by_default() -> None:
    unet = build_unet("attn")
    calib = _calib("attn")
    qunet = qdiff_ao.quantize(unet, None, calib=calib, reconstruct=False, progress=False)
    info = qunet.quantization_info["bias_correction"]  # the recipe's correction is the grouped one now
    assert info["method"] == "timestep_groups" and len(info["groups"]) == len(calib.timesteps())
    module = qunet.graph_module.get_submodule("qdiff_output_correction")
    assert tuple(module.bias.shape) == (len(calib.timesteps()), unet.config.out_channels)
    off = qdiff_ao.quantize(unet, None, calib=calib, reconstruct=False, bias_correction=False, progress=False)
    assert off.quantization_info["bias_correction"] is None
