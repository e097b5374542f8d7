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
    shipped = qdiff_ao.QuantizedUNet(qdiff_ao.convert(copy.deepcopy(prepared)), like=unet).optimize_for_inference()
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
