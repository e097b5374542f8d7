"""The reconstruction choice: a second run of the final decoder stage restored onto the first run's blocks
(``reconstruct(restore=...)``), the distance to the float samples that judges the two (and the float-model
denoising ratio it reports), and ``quantize`` keeping the run with the lower score."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from hypothesis import given, settings
from hypothesis import strategies as st

import qdiff_ao
from qdiff_ao.app.bundled import DIGITS_DDPM_DIR
from qdiff_ao.calibration._plan import plan_sampler
from qdiff_ao.passes.prediction_spread import SAMPLER_ARGUMENTS
from qdiff_ao.passes.reconstruction.resume_state import ReconstructionState
from qdiff_ao.passes.reconstruction.runner import reconstruct
from qdiff_ao.passes.reconstruction_choice import (
    SWITCH_CONFIDENCE,
    final_stage,
    reconstruct_and_choose,
    sample_distance,
    sample_score,
    switch_confidence,
)
from tests.test_reconstruct import calib_for, prepared_for, tiny_cond_unet, tiny_unet

RCFG = {"weight_iters": 6, "act_iters": 2, "batch_size": 4}


def test_final_stage_is_the_last_up_block_and_what_follows_it() -> None:
    blocks = ["conv_in", "down_blocks.0.resnets.0", "mid_block.resnets.0", "up_blocks.0.resnets.0",
              "up_blocks.1.resnets.0", "up_blocks.1.upsamplers.0.conv", "up_blocks.10.resnets.0",
              "up_blocks.10.resnets.1", "conv_out"]
    assert final_stage(blocks) == ["up_blocks.10.resnets.0", "up_blocks.10.resnets.1", "conv_out"]
    assert final_stage(blocks[:6]) == ["up_blocks.1.resnets.0", "up_blocks.1.upsamplers.0.conv"]
    # no decoder stage by name: the last quarter of the blocks, at least one
    assert final_stage([f"layer{i}" for i in range(8)]) == ["layer6", "layer7"]
    assert final_stage(["only"]) == ["only"]


def test_restore_keeps_the_other_runs_blocks_and_learns_the_rest(tmp_path: Path) -> None:
    unet = tiny_unet()
    calib = calib_for(unet)
    prepared = prepared_for(unet, calib, weight_bits=4, act_bits=8)
    second = copy.deepcopy(prepared)
    path = tmp_path / "a.safetensors"
    reconstruct(prepared, calib, qdiff_ao.ReconstructionConfig(**RCFG), model=unet, progress=False, state_path=path)
    blocks_a = qdiff_ao.graph_info(prepared).reconstruction["blocks"]
    redone = final_stage(list(blocks_a))
    state = ReconstructionState(path, None)  # no fingerprint: readable by a run with other settings
    state.forget(redone)
    with pytest.raises(ValueError, match="read-only"):
        state.add("x", {}, {}, {})
    reconstruct(second, calib, qdiff_ao.ReconstructionConfig(**RCFG, seed=5), model=unet, progress=False,
                restore=state)
    blocks_b = qdiff_ao.graph_info(second).reconstruction["blocks"]
    assert list(blocks_b) == list(blocks_a)
    assert [name for name, entry in blocks_b.items() if not entry.get("resumed")] == redone
    weights_a, weights_b = dict(prepared.named_parameters()), dict(second.named_parameters())
    restored_layers = [layer for name in blocks_a if name not in redone for layer in blocks_a[name]["layers"]]
    assert restored_layers
    for layer in restored_layers:  # baked grid values: the restored codes give the same weights exactly
        assert torch.equal(weights_a[f"{layer}.weight"], weights_b[f"{layer}.weight"]), layer
    with torch.no_grad():
        x = calib.example_inputs(4)
        assert torch.isfinite(qdiff_ao.convert(second)(**x)).all()


def _plan(unet: torch.nn.Module, scheduler: DDIMScheduler, steps: int = 8, **conditioning: object) -> object:
    return plan_sampler(unet, scheduler, num_inference_steps=steps, **{**SAMPLER_ARGUMENTS, **conditioning})


@pytest.mark.skipif(not (DIGITS_DDPM_DIR / "unet" / "diffusion_pytorch_model.safetensors").is_file(),
                    reason="bundled digits DDPM not trained yet (examples/train_ddpm.py)")
def test_score_ranks_a_spoiled_output_layer_below_a_faithful_model() -> None:
    """On a trained model (the bundled digits DDPM): a W8 weights-only graph samples as the float model does, ratio
    ~1 and samples near the float ones; the same graph with its output layer's weights scaled by 0.9 leaves noise
    in its samples that the float model sees (probe: ratio 7.8 with 16 trajectories), and they end further from
    the float samples. An untrained UNet could not tell them apart."""
    unet = UNet2DModel.from_pretrained(DIGITS_DDPM_DIR / "unet").eval()
    scheduler = DDIMScheduler.from_pretrained(DIGITS_DDPM_DIR / "scheduler")
    calib = qdiff_ao.collect_calibration_data(unet, scheduler, num_inference_steps=10, num_timesteps=5,
                                              samples_per_timestep=2, progress=False)
    faithful = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(weight_bits=8, act_bits=None), calib.example_inputs(1))
    qdiff_ao.calibrate(faithful, calib, progress=False)
    spoiled = copy.deepcopy(faithful)
    with torch.no_grad():
        spoiled.get_submodule("conv_out").weight.mul_(0.9)
    plan = _plan(unet, scheduler, 10)
    scores, ratios = sample_score([faithful, spoiled], plan, num_trajectories=8)
    assert abs(ratios[0] - 1) < 0.05, ratios
    assert ratios[1] > 2 and scores[1] > scores[0] + 0.5, (scores, ratios)
    near, far = sample_distance([faithful, spoiled], plan, num_trajectories=8)  # the choice's score
    assert near.shape == far.shape == (8,)
    assert near.mean() < 0.1 and far.mean() > 2 * near.mean(), (near, far)


def test_conditional_score_uses_the_conditioning_of_each_sample() -> None:
    """With classifier-free guidance the sampler's batches are [uncond; cond], the judge's are the samples with
    their conditional embedding alone (a doubled batch would not fit); a W8 weights-only graph scores ~1."""
    unet = tiny_cond_unet()
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(2, 4, 16, generator=g), torch.zeros(1, 4, 16)
    plan = _plan(unet, scheduler, 4, encoder_hidden_states=cond, negative_encoder_hidden_states=uncond,
                 guidance_scale=3.0)
    calib = calib_for(unet, cond=True)
    prepared = prepared_for(unet, calib, weight_bits=8, act_bits=None)
    scores, ratios = sample_score([prepared], plan, num_trajectories=4)
    assert ratios[0] == pytest.approx(1.0, abs=0.05) and scores[0] < 0.05


def test_quantize_keeps_the_run_with_the_lower_score() -> None:
    unet = tiny_unet()
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    cfg = qdiff_ao.QuantConfig(reconstruction=qdiff_ao.ReconstructionConfig(**RCFG))
    kwargs = {"num_inference_steps": 10, "num_timesteps": 4, "samples_per_timestep": 4, "progress": False,
              "precision_fallback": False, "timestep_groups": 1, "bias_correction": False,
              "prediction_spread": False}
    qunet = qdiff_ao.quantize(unet, scheduler, cfg, **kwargs)
    report = qunet.quantization_info["reconstruction"]
    choice = report["choice"]
    assert choice["redone"] == final_stage(list(report["blocks"]))
    switch = choice["scores"][1] < choice["scores"][0] and choice["confidence_b_better"] >= SWITCH_CONFIDENCE
    assert choice["kept"] == ("B" if switch else "A")
    assert choice["seeds"][0] == 0 and choice["seeds"][1] != 0
    resumed = [name for name, entry in report["blocks"].items() if entry.get("resumed")]
    assert resumed == ([] if choice["kept"] == "A" else [n for n in report["blocks"] if n not in choice["redone"]])
    single = qdiff_ao.quantize(unet, scheduler, cfg, choose_reconstruction=False, **kwargs)
    assert "choice" not in single.quantization_info["reconstruction"]
    for bad in (1, True, 2.0):  # refused before any calibration data are sampled
        with pytest.raises(ValueError, match="reconstruction_candidates must be an int >= 2"):
            qdiff_ao.quantize(unet, scheduler, cfg, reconstruction_candidates=bad, **kwargs)


def test_without_a_sampler_the_choice_is_one_plain_run(caplog: pytest.LogCaptureFixture,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A conditional UNet and no conditioning: no sampler can be planned, so the choice makes run A alone, in
    place and without copying the graph, with the same result as ``reconstruct`` and a warning that says why."""
    unet = tiny_cond_unet()
    calib = calib_for(unet, cond=True)
    prepared = prepared_for(unet, calib, weight_bits=4, act_bits=8)
    plain = copy.deepcopy(prepared)
    rcfg = qdiff_ao.ReconstructionConfig(**RCFG)

    deepcopy = copy.deepcopy

    def no_copy(obj: object, *args: object) -> object:
        if isinstance(obj, torch.nn.Module):  # the graph module; its fx.Graph alone is copied by every run
            raise AssertionError("the graph module was copied although no second run can be judged")
        return deepcopy(obj, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    with caplog.at_level("WARNING", logger="qdiff_ao"):
        kept = reconstruct_and_choose(prepared, calib, rcfg, unet, DDIMScheduler(), model=unet, progress=False)
    monkeypatch.undo()
    assert kept is prepared
    assert "choice" not in qdiff_ao.graph_info(kept).reconstruction
    assert any("reconstruction choice skipped" in record.getMessage() for record in caplog.records)
    reconstruct(plain, calib, rcfg, model=unet, progress=False)
    for (name, a), (_, b) in zip(kept.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), name


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(8, 96), shift=st.floats(0.0, 0.5))
def test_switch_confidence_needs_a_difference_beyond_the_scatter(seed: int, n: int, shift: float) -> None:
    """Paired bootstrap: a run no different from A never earns a switch; one whose every trajectory costs ``1 +
    shift`` times less than A's does once the gap is clear; swapping A and B turns the share into its complement
    (ties count for neither); costs of different lengths are refused."""
    g = torch.Generator().manual_seed(seed)
    b = (torch.rand(n, generator=g, dtype=torch.float64) + 0.1) * (1 + 0.05 * torch.randn(n, generator=g,
                                                                                            dtype=torch.float64))
    a = b * (1 + shift) * (1 + 0.05 * torch.randn(n, generator=g, dtype=torch.float64))
    assert switch_confidence(a, a.clone()) == 0.0
    both = switch_confidence(a, b) + switch_confidence(b, a)
    assert both <= 1.0 + 1e-12
    if shift > 0.2:
        assert switch_confidence(a, b) >= SWITCH_CONFIDENCE
    with pytest.raises(ValueError, match="one cost per trajectory"):
        switch_confidence(a, b[:-1])


def test_more_candidates_judge_every_rerun_and_keep_the_nearest_past_the_guard() -> None:
    """Three runs: A and two reruns of the final stage with their own seeds; the best rerun replaces A only when it
    is nearer the float samples with bootstrap confidence >= SWITCH_CONFIDENCE; fewer than two runs are refused."""
    unet = tiny_unet()
    calib = calib_for(unet)
    prepared = prepared_for(unet, calib, weight_bits=4, act_bits=8)
    rcfg = qdiff_ao.ReconstructionConfig(**RCFG)
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    with pytest.raises(ValueError, match="candidates must be an int >= 2"):
        reconstruct_and_choose(copy.deepcopy(prepared), calib, rcfg, unet, scheduler, model=unet, progress=False,
                               candidates=1)
    kept = reconstruct_and_choose(prepared, calib, rcfg, unet, scheduler, model=unet, progress=False, candidates=3,
                                  num_trajectories=8, num_inference_steps=6)
    choice = qdiff_ao.graph_info(kept).reconstruction["choice"]
    scores = choice["scores"]
    assert len(scores) == 3 and len(set(choice["seeds"])) == 3 and choice["seeds"][0] == rcfg.seed
    best = "B" if scores[1] <= scores[2] else "C"
    assert choice["best_rerun"] == best
    switch = scores["BC".index(best) + 1] < scores[0] and choice["confidence_b_better"] >= SWITCH_CONFIDENCE
    assert choice["kept"] == (best if switch else "A")
    assert (kept is prepared) == (choice["kept"] == "A")
