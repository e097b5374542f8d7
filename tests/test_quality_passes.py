"""Tests of the measured quality mechanisms: keep_float, the sensitivity report and the per-timestep-group output
correction (the precision fallback: test_precision_fallback.py)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import qdiff_ao
from qdiff_ao.calibration.sensitivity import sensitivity
from qdiff_ao.passes.output_correction import OUTPUT_CORRECTION, TimestepOutputCorrection, correct_output
from tests.quality_fixtures import benign_calib, build_unet, calibrated_prepared, late_step_calib, unet_inputs

# --- keep_float -------------------------------------------------------------------------------------------------

def test_keep_float_layer_stays_float_through_convert() -> None:
    calib = benign_calib()
    cfg = qdiff_ao.QuantConfig(keep_float=["conv_in"])  # a list (as from JSON) becomes a tuple
    assert cfg.keep_float == ("conv_in",)
    assert qdiff_ao.QuantConfig.from_dict(cfg.to_dict()) == cfg
    _, prepared = calibrated_prepared(calib, cfg)
    assert type(prepared.get_submodule("conv_in")) is nn.Conv2d  # no weight fake-quant, no qconfig
    converted = qdiff_ao.convert(prepared)
    assert type(converted.get_submodule("conv_in")) is nn.Conv2d
    assert type(converted.get_submodule("conv_out")).__module__.startswith("torch.ao.nn.quantized")
    # The float input reaches conv_in directly: no quantize_per_tensor on the sample placeholder's path.
    conv_in = next(n for n in converted.graph.nodes if n.op == "call_module" and n.target == "conv_in")
    assert "quantize" not in str(conv_in.args[0].target)


@pytest.mark.parametrize("names, match", [(("nope",), "not Conv2d/Linear"), ((3,), "tuple of module names"),
                                          (("conv_in", "conv_in"), "repeated")])
def test_keep_float_rejects_bad_names(names: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cfg = qdiff_ao.QuantConfig(keep_float=names)
        qdiff_ao.prepare(build_unet(), cfg, unet_inputs(2))


# --- sensitivity ------------------------------------------------------------------------------------------------

def test_sensitivity_finds_the_invisible_late_step_input(tmp_path: Path) -> None:
    calib = late_step_calib()
    _, prepared = calibrated_prepared(calib)
    report = sensitivity(prepared, calib, rows_per_timestep=2)
    assert report.timesteps == (10.0, 900.0)
    kinds = {r.kind for r in report.rows}
    assert kinds == {"activation", "weight"}
    n_weights = sum(1 for m in prepared.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert sum(r.kind == "weight" for r in report.rows) == n_weights
    # In a random-weight UNet the late steps' tiny input stays tiny after conv_in, so both the input quantizer and
    # conv_in's output quantizer are blind there; every other quantizer matters far less.
    top = {r.value: r for r in report.ranked()[:2]}
    assert set(top) == {"sample", "conv_in"}
    assert top["sample"].layers == ("conv_in",) and top["sample"].kind == "activation"
    assert "conv_in" in top["conv_in"].layers  # the producer is among the layers whose fallback removes it
    for row in top.values():
        assert row.errors[0] > 0.1 > 0.05 > row.errors[1]  # blind at t = 10, harmless at t = 900
        assert row.worst > 20 * report.median_worst()
    assert math.isclose(max(report.all_on), report.all_on[0])
    assert "sample" in report.format_table(3)
    report.plot(tmp_path / "heat.png")
    assert (tmp_path / "heat.png").stat().st_size > 1000
    assert report.to_dict(top=2)["rows"][0]["name"] == report.ranked()[0].name


def test_sensitivity_leaves_the_prepared_graph_alone_and_checks_arguments() -> None:
    calib = benign_calib()
    _, prepared = calibrated_prepared(calib)
    x = calib.example_inputs(2)
    before = prepared(**x)
    sensitivity(prepared, calib, rows_per_timestep=1, kinds=("activation",))
    assert torch.equal(prepared(**x), before)
    with pytest.raises(ValueError, match="kinds"):
        sensitivity(prepared, calib, kinds=("bias",))
    with pytest.raises(ValueError, match="rows_per_timestep"):
        sensitivity(prepared, calib, rows_per_timestep=0)
    with pytest.raises(TypeError, match="CalibrationSet"):
        sensitivity(prepared, {"sample": x["sample"]})  # type: ignore[arg-type]


# --- output correction ------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 999, allow_nan=False), min_size=1, max_size=6, unique=True),
       st.lists(st.floats(-1000, 2000, allow_nan=False), min_size=1, max_size=8))
def test_correction_group_is_the_interval_holding_t(bounds: list[float], ts: list[float]) -> None:
    bounds = sorted(bounds)
    module = TimestepOutputCorrection(len(bounds) + 1, 2)
    module.boundaries.copy_(torch.tensor(bounds))
    module.bias.copy_(torch.arange(len(bounds) + 1, dtype=torch.float32).view(-1, 1).expand(-1, 2))
    t = torch.tensor(ts, dtype=torch.float32)
    groups = module.group_of(t)
    expected = [sum(b <= v for b in torch.tensor(bounds).tolist()) for v in t.tolist()]
    assert groups.tolist() == expected
    y = torch.zeros(len(ts), 2, 3, 3)
    out = module(y, t)
    assert torch.equal(out[:, 0, 0, 0], -groups.float())


def test_output_correction_is_kept_only_where_it_helps_left_out_trajectories() -> None:
    calib = _calibration_over_steps()
    unet, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig())
    correct_output(prepared, calib, unet, num_groups=3, gain=True, input_term=True)  # every candidate offered
    report = qdiff_ao.graph_info(prepared).bias_correction
    assert report["method"] == "timestep_groups" and len(report["groups"]) == 3
    module = getattr(prepared, OUTPUT_CORRECTION)
    assert module.gain is not None
    assert (module.input_gain is not None) == any(row["kind"] == "input" for row in report["groups"])
    for g, row in enumerate(report["groups"]):
        # the held-back winner among none / offset / gain / input; "none" wins ties
        assert row["mse_after"] == min(row["mse_before"], row["mse_offset"], row["mse_gain"], row["mse_input"])
        assert row["kept"] == (row["mse_after"] < row["mse_before"]) == (row["kind"] != "none")
        # the paired z agrees with the summed errors: a kept candidate lowered the mean left-out error
        assert (row["z"] < 0) if row["kept"] else (row["z"] == 0)
        assert row["num_trajectories"] == 4  # every trajectory of the set was left out once
        assert bool(module.bias[g].abs().sum() > 0) == row["kept"]
        assert bool((module.gain[g] != 1).any()) == (row["kind"] in ("gain", "input"))
        if module.input_gain is not None:
            assert bool((module.input_gain[g] != 0).any()) == (row["kind"] == "input")
    assert report["boundaries"] == sorted(report["boundaries"])


def test_offsets_only_correction_has_no_gain_buffers_and_ignores_the_other_candidates() -> None:
    calib = _calibration_over_steps()
    unet, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig())
    correct_output(prepared, calib, unet, num_groups=3)  # the default: offsets only
    module = getattr(prepared, OUTPUT_CORRECTION)
    assert module.gain is None and "gain" not in dict(module.named_buffers())
    assert module.input_gain is None and "input_gain" not in dict(module.named_buffers())
    for row in qdiff_ao.graph_info(prepared).bias_correction["groups"]:
        assert row["kind"] in ("none", "offset") and row["mse_gain"] is None and row["mse_input"] is None


@torch.no_grad()
def test_input_term_is_offered_and_lowered_as_a_y_plus_c_x_minus_b() -> None:
    """``input_term=True`` offers ``a y + c x - b`` in every group (in = out channels); a correction with input gains
    reads the graph's ``sample`` input and computes exactly that formula of the uncorrected output ``y``."""
    from qdiff_ao.passes.output_correction import add_output_correction
    from qdiff_ao.quantizers.simulation import output_tensor

    calib = _calibration_over_steps()
    unet, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig())
    plain = copy.deepcopy(prepared)
    correct_output(prepared, calib, unet, num_groups=3, input_term=True)
    assert all(row["mse_input"] is not None for row in qdiff_ao.graph_info(prepared).bias_correction["groups"])
    corrected = copy.deepcopy(plain)
    channels = getattr(prepared, OUTPUT_CORRECTION).bias.shape[1]
    module = add_output_correction(corrected, 3, channels, gain=True, input_gain=True)
    module.boundaries.copy_(torch.tensor([300.0, 800.0]))
    module.gain.copy_(torch.tensor([0.9, 1.0, 1.1]).view(3, 1).expand(3, channels))
    module.input_gain.copy_(torch.tensor([0.0, 0.1, 0.2]).view(3, 1).expand(3, channels))
    module.bias.copy_(torch.tensor([0.5, -0.5, 0.25]).view(3, 1).expand(3, channels))
    node = next(n for n in corrected.graph.nodes if n.op == "call_module" and n.target == OUTPUT_CORRECTION)
    source = node.args[2]
    while source.op != "placeholder":  # through the input guard
        source = source.args[0]
    assert source.target == "sample"
    for t, g in ((900, 2), (500, 1), (100, 0)):
        inputs = unet_inputs(3, t=t, seed=9)
        y, out = output_tensor(plain(**inputs)), output_tensor(corrected(**inputs))
        expected = module.gain[g, 0] * y + module.input_gain[g, 0] * inputs["sample"] - module.bias[g, 0]
        assert torch.allclose(out, expected, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(st.floats(0.5, 1.5), st.floats(-0.5, 0.5), st.floats(-1, 1), st.integers(0, 2**16))
def test_fit_recovers_a_planted_correction(gain: float, input_gain: float, offset: float, seed: int) -> None:
    """y_fp = a y_q + c x + d exactly  =>  the input fit returns (a, c, -d), and with c = 0 the gain fit returns
    (a, 0, -d); the offset candidate is the mean difference."""
    from qdiff_ao.passes.output_fit import channel_moments, fit_candidates

    g = torch.Generator().manual_seed(seed)
    y_q = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    x = torch.randn(6, 2, 4, 4, generator=g, dtype=torch.float64)
    y_fp = gain * y_q + input_gain * x + offset
    a, c, b = fit_candidates(channel_moments(y_q, y_fp, x))["input"]
    for got, want in ((a, gain), (c, input_gain), (b, -offset)):
        assert torch.allclose(got, torch.full((2,), want, dtype=torch.float64), atol=1e-6)
    a, c, b = fit_candidates(channel_moments(y_q, gain * y_q + offset, None))["gain"]
    assert torch.allclose(a, torch.full((2,), gain, dtype=torch.float64), atol=1e-6)
    assert torch.equal(c, torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(b, torch.full((2,), -offset, dtype=torch.float64), atol=1e-6)
    _, _, b_offset = fit_candidates(channel_moments(y_q, y_fp, x))["offset"]
    assert torch.allclose(b_offset, (y_q - y_fp).mean(dim=(0, 2, 3)), atol=1e-9)
    # a regressor without variance keeps its neutral coefficient instead of an arbitrary one
    a, c, _ = fit_candidates(channel_moments(torch.ones_like(y_fp), y_fp, torch.zeros_like(x)))["input"]
    assert torch.equal(a, torch.ones(2, dtype=torch.float64)) and torch.equal(c, torch.zeros(2, dtype=torch.float64))


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(1, 3), st.floats(-0.5, 0.5), st.integers(0, 2**16))
def test_left_out_errors_equal_the_direct_computation(trajectories: int, channels: int, offset: float,
                                                      seed: int) -> None:
    """For every trajectory j and candidate, the moment-based left-out error equals fitting on the other
    trajectories' outputs directly and summing |a q + c x - b - f|^2 over j's own outputs."""
    from qdiff_ao.passes.output_fit import KINDS, channel_moments, fit_candidates, left_out_errors, row_moments

    g = torch.Generator().manual_seed(seed)
    y_q = torch.randn(trajectories, channels, 3, 3, generator=g, dtype=torch.float64)
    x = torch.randn(trajectories, channels, 3, 3, generator=g, dtype=torch.float64)
    y_fp = 0.9 * y_q + 0.1 * x + offset + 0.05 * torch.randn(y_q.shape, generator=g, dtype=torch.float64)
    errors, values = left_out_errors(row_moments(y_q, y_fp, x), KINDS)
    assert values == y_q.numel()
    for j in range(trajectories):
        others = [k for k in range(trajectories) if k != j]
        fits = fit_candidates(channel_moments(y_q[others], y_fp[others], x[others]), KINDS)
        for i, kind in enumerate(KINDS):
            a, c, b = (v.view(1, -1, 1, 1) for v in fits[kind])
            direct = (a * y_q[j:j + 1] + c * x[j:j + 1] - b - y_fp[j:j + 1]).pow(2).sum()
            assert torch.allclose(errors[i, j], direct, rtol=1e-6, atol=1e-9), (kind, j)
    # a candidate not offered and a trajectory without rows are NaN
    only, _ = left_out_errors(torch.cat([row_moments(y_q, y_fp, x), torch.zeros(1, channels, 4, 4,
                                                                                 dtype=torch.float64)]),
                              ("none", "offset"))
    assert only[2:].isnan().all() and only[:, -1].isnan().all() and only[:2, :-1].isfinite().all()


def test_a_planted_output_offset_is_kept_with_strong_paired_evidence() -> None:
    """y_q = y_fp + 0.1 + small noise on every trajectory: the offset wins in every group, the left-out error
    falls by nearly all of it and the paired z is far below 0; the fitted bias is the planted 0.1."""
    from qdiff_ao.passes.output_fit import KINDS, fit_candidates, left_out_errors, row_moments

    g = torch.Generator().manual_seed(0)
    y_fp = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64)
    y_q = y_fp + 0.1 + 0.01 * torch.randn(y_fp.shape, generator=g, dtype=torch.float64)
    moments = row_moments(y_q, y_fp, None)
    errors, _ = left_out_errors(moments, ("none", "offset"))
    assert errors[1].sum() < 0.02 * errors[0].sum()
    from qdiff_ao.passes.paired_trajectories import paired_z

    assert paired_z(errors[0], errors[KINDS.index("offset")])[1] < -10
    _, _, b = fit_candidates(moments.sum(0), ("offset",))["offset"]
    assert torch.allclose(b, torch.full((3,), 0.1, dtype=torch.float64), atol=0.01)


def test_gain_correction_commutes_with_the_guided_combination() -> None:
    """a y - b on both rows of a pair = a (u + s (c - u)) - b on the guided output: fitting on guided outputs and
    applying to raw rows is exact."""
    module = TimestepOutputCorrection(1, 2, gain=True)
    module.gain.copy_(torch.tensor([[0.9, 1.2]]))
    module.bias.copy_(torch.tensor([[0.3, -0.5]]))
    u, c, s, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), 7.5, torch.full((3,), 500.0)
    guided = module(u, t) + s * (module(c, t) - module(u, t))
    expected = module(u + s * (c - u), t)
    assert torch.allclose(guided, expected, atol=1e-4)


def _calibration_over_steps() -> qdiff_ao.CalibrationSet:
    parts = [unet_inputs(4, t=t, seed=i) for i, t in enumerate((950, 700, 450, 200, 50, 10))]
    return qdiff_ao.CalibrationSet(torch.cat([p["sample"] for p in parts]), torch.cat([p["timestep"] for p in parts]))


@torch.no_grad()
def test_output_correction_is_fitted_on_the_lowered_int8_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the correction's ``y_q`` are the outputs of the model ``convert`` ships (lowered, frozen), not the
    fake-quant simulation's: one group's kept offset is the mean of ``y_int8 - y_fp`` over every row."""
    from qdiff_ao.passes import sampler_runs

    calib = _calibration_over_steps()
    unet, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig())
    prepared.get_submodule("conv_out").bias.add_(0.3)  # a visible planted offset: the group surely keeps one
    shipped = qdiff_ao.QuantizedUNet(qdiff_ao.convert(copy.deepcopy(prepared)), like=unet).optimize_for_inference()
    rows = {"sample": calib.sample, "timestep": calib.timestep}
    expected = (shipped(**rows, return_dict=False)[0] - unet(**rows).sample).double().transpose(0, 1).flatten(1)
    monkeypatch.setattr(sampler_runs, "build_simulation", lambda *_: pytest.fail("built a simulation"))
    correct_output(prepared, calib, unet, num_groups=1)
    module = getattr(prepared, OUTPUT_CORRECTION)
    assert qdiff_ao.graph_info(prepared).bias_correction["groups"][0]["kind"] == "offset"
    torch.testing.assert_close(module.bias[0].double(), expected.mean(1), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_corrected_model_converts_saves_and_reloads_bit_identical(tmp_path: Path) -> None:
    calib = _calibration_over_steps()
    unet, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig())
    correct_output(prepared, calib, unet, num_groups=3, gain=True)
    module = getattr(prepared, OUTPUT_CORRECTION)
    module.bias.copy_(torch.tensor([[0.0], [1.0], [2.0]]).expand_as(module.bias))  # distinct, visible offsets
    module.gain.copy_(torch.tensor([[0.5], [1.0], [1.0]]).expand_as(module.gain))  # and a visible gain at t = 10
    without_gain = copy.deepcopy(prepared)  # convert works in place
    getattr(without_gain, OUTPUT_CORRECTION).gain.fill_(1.0)
    qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
    x = unet_inputs(2, t=10)
    x_late = {**x, "timestep": torch.full((2,), 950)}
    gap = (qunet(**x_late).sample - qunet(**x).sample).mean()
    assert gap < -1.0  # the late group's larger offset is subtracted
    qunet.save_pretrained(tmp_path / "ckpt")
    assert '"gain": true' in (tmp_path / "ckpt" / "config.json").read_text()
    loaded = qdiff_ao.QuantizedUNet.from_pretrained(tmp_path / "ckpt")
    for inputs in (x, x_late):
        assert torch.equal(loaded(**inputs).sample, qunet(**inputs).sample)
    plain = qdiff_ao.QuantizedUNet(qdiff_ao.convert(without_gain), like=unet)
    # the gain is applied: y halved at t = 10 (group 0, no offset)
    assert torch.allclose(qunet(**x).sample, 0.5 * plain(**x).sample, atol=1e-6)


@torch.no_grad()
def test_offsets_only_checkpoint_keeps_the_layout_without_gains(tmp_path: Path) -> None:
    """Checkpoints written before gains existed have no gain tensor and no "gain" record; that layout stays."""
    calib = _calibration_over_steps()
    unet, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig())
    correct_output(prepared, calib, unet, num_groups=3, gain=False, input_term=False)
    qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
    qunet.save_pretrained(tmp_path / "ckpt")
    body = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "gain" not in body["output_correction"] and "input_gain" not in body["output_correction"]
    assert body["format_version"] == 1
    loaded = qdiff_ao.QuantizedUNet.from_pretrained(tmp_path / "ckpt")
    x = unet_inputs(2, t=10)
    assert torch.equal(loaded(**x).sample, qunet(**x).sample)


@torch.no_grad()
def test_input_gains_round_trip_through_a_version_3_checkpoint(tmp_path: Path) -> None:
    """Input gains are recorded (``output_correction.input_gain``) in a format version 3 checkpoint, which older
    readers refuse instead of rebuilding the graph without them; this reader restores them bit for bit."""
    from qdiff_ao.passes.output_correction import add_output_correction

    calib = _calibration_over_steps()
    unet, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig())
    channels = unet.config.out_channels
    module = add_output_correction(prepared, 2, channels, gain=True, input_gain=True)
    module.boundaries.fill_(500.0)
    module.gain.fill_(0.8)
    module.input_gain.copy_(torch.tensor([[0.0], [0.2]]).expand(2, channels))
    zeroed = copy.deepcopy(prepared)  # convert works in place
    getattr(zeroed, OUTPUT_CORRECTION).input_gain.zero_()
    without = qdiff_ao.QuantizedUNet(qdiff_ao.convert(zeroed), like=unet)
    qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
    qunet.save_pretrained(tmp_path / "ckpt")
    body = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert body["output_correction"]["input_gain"] is True and body["format_version"] == 3
    loaded = qdiff_ao.QuantizedUNet.from_pretrained(tmp_path / "ckpt")
    for t in (10, 950):
        x = unet_inputs(2, t=t)
        assert torch.equal(loaded(**x).sample, qunet(**x).sample)
    for t, c in ((950, 0.2), (10, 0.0)):  # the input term of each group, against the same graph without it
        x = unet_inputs(2, t=t)
        assert torch.allclose(loaded(**x).sample - without(**x).sample, c * x["sample"], atol=1e-5)


def test_output_correction_needs_two_rows_per_timestep() -> None:
    calib = benign_calib(rows=1)
    unet, prepared = calibrated_prepared(calib)
    with pytest.raises(ValueError, match=">= 2 trajectories"):
        correct_output(prepared, calib, unet)


def test_static_bias_correction_refuses_a_float_output_layer() -> None:
    from qdiff_ao.passes.bias_correction import find_output_layer

    calib = benign_calib()
    _, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig(keep_float=("conv_out",)))
    with pytest.raises(ValueError, match="kept in float"):
        find_output_layer(prepared)


def test_checkpoint_of_a_model_loaded_from_a_path_object(tmp_path: Path) -> None:
    """diffusers records from_pretrained(Path(...)) as a Path in the config; saving must not choke on it."""
    unet = build_unet()
    unet.save_pretrained(tmp_path / "fp")
    loaded = type(unet).from_pretrained(tmp_path / "fp").eval()
    assert not isinstance(loaded.config["_name_or_path"], str)
    calib = benign_calib(rows=2)
    qunet = qdiff_ao.quantize(loaded, None, calib=calib, reconstruct=False, precision_fallback=False,
                              bias_correction=False, progress=False)
    qunet.save_pretrained(tmp_path / "q")
    config = (tmp_path / "q" / "config.json").read_text()
    assert "_name_or_path" not in config and str(tmp_path) not in config
