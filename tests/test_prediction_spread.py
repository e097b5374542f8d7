"""The denoised-spread correction: the x0 algebra of each prediction type (``passes.denoised_view``), its lowering
in the output correction node and checkpoints, and the fitting pass ``passes.match_prediction_spread`` finding a
planted spread loss on sampler runs."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

import qdiff_ao
from qdiff_ao.passes.denoised_view import PREDICTION_TYPES, predicted_x0, rescale_x0_spread
from qdiff_ao.passes.output_correction import OUTPUT_CORRECTION, add_output_correction
from qdiff_ao.passes.prediction_spread import HARM_Z, match_prediction_spread, paired_harm
from tests.quality_fixtures import build_unet, calibrated_prepared, unet_inputs


def _scheduler(kind: str = "epsilon") -> DDIMScheduler:
    return DDIMScheduler(beta_schedule="linear", prediction_type=kind, clip_sample=False)


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(PREDICTION_TYPES), a=st.floats(1e-3, 0.999), spread=st.floats(0.5, 1.5),
       centre=st.floats(-0.5, 0.5), seed=st.integers(0, 2**16))
def test_rescaled_prediction_has_the_rescaled_x0(kind: str, a: float, spread: float, centre: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    y, x = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    alpha = torch.tensor(a).view(1, 1, 1, 1)
    s, m = torch.tensor(spread).view(1, 1, 1, 1), torch.tensor(centre).view(1, 1, 1, 1)
    x0 = predicted_x0(y, x, alpha, kind)
    out = rescale_x0_spread(y, x, alpha, s, m, kind)
    # x0 of the result: the rescaled x0 (float32 round trip through 1 / slope: bound from |d y / d x0|)
    bound = 1e-5 * (1 + x0.abs().max()) * (1 / a if kind == "epsilon" else 1)
    assert (predicted_x0(out, x, alpha, kind) - (m + s * (x0 - m))).abs().max() <= bound
    assert torch.equal(rescale_x0_spread(y, x, alpha, torch.ones_like(s), m, kind), y)  # spread 1: exactly y
    # affine in y: applied to both rows of a guidance pair it is applied to the guided combination
    u, c, w = y, torch.randn(2, 3, 4, 4, generator=g), 7.5
    guided = rescale_x0_spread(u + w * (c - u), x, alpha, s, m, kind)
    ru, rc = rescale_x0_spread(u, x, alpha, s, m, kind), rescale_x0_spread(c, x, alpha, s, m, kind)
    assert torch.allclose(ru + w * (rc - ru), guided, atol=1e-4 * (1 + guided.abs().max()))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 24), shift=st.floats(0.05, 3.0), seed=st.integers(0, 2**16))
def test_paired_harm_sees_a_move_away_and_nothing_in_no_move(n: int, shift: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, 3, 4, 4, generator=g)
    err = torch.randn(n, 3, 4, 4, generator=g)
    before = ref + 0.1 * err / err.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # every sample 0.1 from its twin
    assert paired_harm(before, before, ref) == (0.0, 0.0)  # no move: no evidence either way
    # every sample pushed further from its twin along its own error by the same factor: equal d_j > 0, so the
    # evidence is as strong as it gets whatever N
    away = ref + (1 + shift) * (before - ref)
    mean, z = paired_harm(before, away, ref)
    assert mean > 0 and z > HARM_Z
    # the same pair read the other way round is a measured improvement: the mean flips sign exactly
    back_mean, back_z = paired_harm(away, before, ref)
    assert back_mean == pytest.approx(-mean, rel=1e-9) and back_z < -HARM_Z
    assert math.isfinite(z) and math.isfinite(back_z)  # the reports are written as strict JSON


def test_paired_harm_does_not_let_one_diverged_sample_decide() -> None:
    """Fifteen samples move slightly closer and one ends far away (a trajectory that lands on another image): the
    summed distance grows, which the plain rel. L2 comparison counted as harm; the paired test sees no evidence."""
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(16, 3, 8, 8, generator=g)
    before = ref + 0.1 * torch.randn(16, 3, 8, 8, generator=g)
    after = ref + 0.95 * (before - ref)
    after[0] = ref[0] + torch.randn(3, 8, 8, generator=g)
    assert (after - ref).norm() > (before - ref).norm()
    mean, z = paired_harm(before, after, ref)
    assert mean > 0 and z <= HARM_Z
    with pytest.raises(ValueError, match=">= 2 samples"):
        paired_harm(before[:1], after[:1], ref[:1])
    with pytest.raises(ValueError, match="equal shapes"):
        paired_harm(before, after[:8], ref)


def test_spread_is_added_to_an_existing_correction_and_survives_a_checkpoint(tmp_path: Path) -> None:
    calib = qdiff_ao.CalibrationSet(torch.randn(8, 3, 8, 8), torch.tensor([900] * 4 + [10] * 4))
    unet, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig())
    channels = unet.config.out_channels
    first = add_output_correction(prepared, 2, channels)
    first.boundaries.fill_(500.0)
    first.bias.copy_(torch.tensor([[0.1], [-0.2]]).expand(2, channels))
    x = unet_inputs(2, t=950)
    before = prepared(**x)
    module = add_output_correction(prepared, 2, channels, spread="epsilon")
    assert module is not first and getattr(prepared, OUTPUT_CORRECTION) is module
    assert torch.equal(module.bias, first.bias) and torch.equal(module.boundaries, first.boundaries)
    alphas = _scheduler().alphas_cumprod
    module.alphas_cumprod.copy_(alphas)
    assert torch.equal(prepared(**x), before)  # identity spread: the same outputs
    module.spread_gain[1].fill_(1.2)
    module.spread_centre[1].fill_(0.05)
    a = alphas[950].view(1, 1, 1, 1)
    expected = rescale_x0_spread(before, x["sample"], a, torch.tensor(1.2), torch.tensor(0.05), "epsilon")
    assert torch.allclose(prepared(**x), expected, atol=1e-4)
    qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
    qunet.save_pretrained(tmp_path / "ckpt")
    body = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert body["format_version"] == 4 and body["output_correction"]["spread"] == "epsilon"
    loaded = qdiff_ao.QuantizedUNet.from_pretrained(tmp_path / "ckpt")
    for t in (10, 950):
        x = unet_inputs(2, t=t)
        assert torch.equal(loaded(**x).sample, qunet(**x).sample)
    with pytest.raises(ValueError, match="already has an output correction"):
        add_output_correction(prepared, 2, channels, spread="v_prediction")


def test_spread_runs_on_openvino_as_on_fbgemm() -> None:
    """The exported correction node (alphas gathered at the runtime timestep) does on OpenVINO what it does on
    fbgemm: the change the spread makes to the output agrees within the engines' kernel differences."""
    pytest.importorskip("openvino")
    calib = qdiff_ao.CalibrationSet(torch.randn(8, 3, 8, 8), torch.tensor([900] * 4 + [10] * 4))
    unet, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig())
    module = add_output_correction(prepared, 2, unet.config.out_channels, spread="epsilon")
    module.boundaries.fill_(500.0)
    module.alphas_cumprod.copy_(_scheduler().alphas_cumprod)
    module.spread_gain[1].fill_(1.5)  # t >= 500 only
    x = unet_inputs(4, t=950)
    x["timestep"] = torch.tensor([950, 950, 10, 10])
    outs = {}
    for spread in (1.5, 1.0):
        module.spread_gain[1].fill_(spread)
        for backend in ("torch", "openvino"):
            qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(copy.deepcopy(prepared)), like=unet)
            qunet.optimize_for_inference(backend=backend)
            with torch.no_grad():
                outs[spread, backend] = qunet(**x).sample
    for backend in ("torch", "openvino"):
        effect = outs[1.5, backend] - outs[1.0, backend]
        assert effect[2:].abs().max() == 0  # the t = 10 rows are in the group without a spread
        assert effect[:2].norm() > 0.1 * outs[1.0, backend][:2].norm()
    effects = [outs[1.5, b] - outs[1.0, b] for b in ("torch", "openvino")]
    assert (effects[1] - effects[0]).norm() < 0.1 * effects[0].norm()


def test_fit_finds_a_planted_spread_loss_on_sampler_runs() -> None:
    """A sample-predicting model whose quantized graph shrinks its output (hence x0) by 0.8 at every step: the
    fitted spread undoes it (1 / 0.8 = 1.25) in every group the sampler visits, and the held-back runs keep it."""
    scheduler = _scheduler("sample")
    unet = build_unet()
    calib = qdiff_ao.collect_calibration_data(unet, scheduler, num_inference_steps=10, num_timesteps=5,
                                              samples_per_timestep=4, progress=False)
    prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(weight_bits=8), calib.example_inputs(1))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    planted = add_output_correction(prepared, 1, unet.config.out_channels, gain=True)
    planted.gain.fill_(0.8)
    match_prediction_spread(prepared, calib, unet, scheduler, num_trajectories=8, num_inference_steps=10)
    report = qdiff_ao.graph_info(prepared).prediction_spread
    assert report["kept"] and report["prediction_type"] == "sample"
    assert report["held_mismatch_after"] < report["held_mismatch_before"]
    assert report["held_mismatch_before"] > 0.2  # |log 0.8| = 0.22 before
    module = getattr(prepared, OUTPUT_CORRECTION)
    assert torch.equal(module.gain, torch.full_like(module.gain, 0.8))  # the planted correction is kept as it was
    assert module.spread_gain.mean().item() == pytest.approx(1.25, abs=0.05)


def test_quantize_with_spread_runs_end_to_end_and_records_the_decision() -> None:
    unet = build_unet()
    qunet = qdiff_ao.quantize(unet, _scheduler(), qdiff_ao.QuantConfig(), num_inference_steps=10, num_timesteps=5,
                              samples_per_timestep=4, reconstruct=False, precision_fallback=False,
                              prediction_spread=True, progress=False)
    report = qunet.quantization_info["prediction_spread"]
    assert set(report) >= {"kept", "held_mismatch_before", "held_mismatch_after", "held_harm_z", "spread"}
    module = getattr(qunet.graph_module, OUTPUT_CORRECTION)
    assert (module.spread_gain is not None) == report["kept"]
    with torch.no_grad():
        assert torch.isfinite(qunet(**unet_inputs(2, t=10)).sample).all()


def test_spread_refuses_a_scheduler_without_a_known_prediction_type() -> None:
    calib = qdiff_ao.CalibrationSet(torch.randn(8, 3, 8, 8), torch.tensor([900] * 4 + [10] * 4))
    unet, prepared = calibrated_prepared(calib)
    scheduler = _scheduler()
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type='flow'"):
        match_prediction_spread(prepared, calib, unet, scheduler, num_trajectories=2, num_inference_steps=2)
