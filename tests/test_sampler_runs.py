"""The quantized model the sampler passes (reconstruction choice, spread correction) judge and fit on."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

import qdiff_ao
from qdiff_ao._compat import ObserverBase
from qdiff_ao.calibration._plan import plan_sampler
from qdiff_ao.passes import sampler_runs
from qdiff_ao.passes.output_correction import add_output_correction
from qdiff_ao.passes.prediction_spread import SAMPLER_ARGUMENTS
from qdiff_ao.passes.sampler_runs import quantized_denoiser
from qdiff_ao.quantizers.simulation import build_simulation
from tests.quality_fixtures import benign_calib, calibrated_prepared, unet_inputs


def _prepared_with_groups_and_correction() -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    calib = benign_calib()
    unet, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig())
    qdiff_ao.passes.choose_timestep_groups(prepared, calib, num_groups=2, batch_size=4)
    correction = add_output_correction(prepared, 2, unet.config.out_channels)
    correction.boundaries.fill_(500.0)
    correction.bias.copy_(torch.tensor([[0.05], [-0.1]]).expand(2, unet.config.out_channels))
    return unet, prepared


def test_on_the_cpu_it_is_the_model_quantize_ships_and_the_graph_stays_prepared(
        monkeypatch: pytest.MonkeyPatch) -> None:
    unet, prepared = _prepared_with_groups_and_correction()
    plan = plan_sampler(unet, DDIMScheduler(), num_inference_steps=4, **SAMPLER_ARGUMENTS)
    before = copy.deepcopy(prepared)
    with monkeypatch.context() as patch:  # the lowered model, not the simulation (on this tiny UNet they agree)
        patch.setattr(sampler_runs, "build_simulation", lambda *_: pytest.fail("built a simulation"))
        denoise = quantized_denoiser(prepared, plan)
    shipped = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet).optimize_for_inference()
    with torch.no_grad():
        for t in (900, 10):  # both timestep groups and both correction groups
            inputs = unet_inputs(3, t=t)
            got = denoise(inputs)
            assert torch.equal(got, shipped(**inputs, return_dict=False)[0])
            assert torch.equal(prepared(**inputs), before(**inputs))  # observers still in place, not converted
    assert any(isinstance(m, ObserverBase) for m in prepared.modules())


def test_elsewhere_it_is_the_fake_quant_simulation() -> None:
    unet, prepared = _prepared_with_groups_and_correction()
    plan = plan_sampler(unet, DDIMScheduler(), num_inference_steps=4, **SAMPLER_ARGUMENTS)
    # a plan in another dtype (as a GPU plan): no CPU INT8 lowering for it
    denoise = quantized_denoiser(prepared, dataclasses.replace(plan, dtype=torch.float64))
    sim = build_simulation(prepared)
    sim.gm.eval()
    inputs = unet_inputs(2, t=900)
    with torch.no_grad():
        assert torch.equal(denoise(inputs), sim.run(inputs))


def test_chunked_runs_give_each_trajectory_its_own_conditioning_and_result() -> None:
    """DDIM (eta 0) is deterministic per trajectory: runs over chunks of 2 give the samples of one long run (up to
    the kernels' batch-dependent rounding), each chunk with its trajectories' own conditioning (``offset``)."""
    from tests.test_reconstruct import tiny_cond_unet

    unet = tiny_cond_unet()
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(5, 4, 16, generator=g)  # a distinct embedding per trajectory
    plan = plan_sampler(unet, DDIMScheduler(), num_inference_steps=4, **{
        **SAMPLER_ARGUMENTS, "encoder_hidden_states": cond, "negative_encoder_hidden_states": torch.zeros(1, 4, 16),
        "guidance_scale": 3.0})
    noise = torch.randn(5, *plan.sample_shape, generator=g)
    denoise = sampler_runs.float_denoiser(plan)
    whole = sampler_runs.run_sampler(plan, denoise, noise, None, 0)
    chunked = sampler_runs.run_sampler_in_chunks(plan, denoise, noise, 0, trajectories=2)
    assert chunked.shape == whole.shape
    # batch-dependent rounding of the float kernels: with one thread on an AVX-512 VNNI CPU one value of 1,280 moved
    # by 1.2e-5 (at 0.016); a wrong conditioning moves them by far more (below)
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    shifted = sampler_runs.run_sampler(plan, denoise, noise[2:4], None, 0)  # wrong conditioning: offset 0
    assert not torch.allclose(shifted, whole[2:4], rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="trajectories must be >= 1"):
        sampler_runs.run_sampler_in_chunks(plan, denoise, noise, 0, trajectories=0)
