"""Tests of the model zoo's building blocks: procedural data, class tokens, guided sampling, the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from qdiff_ao.app.zoo.conditioning import ClassTokens
from qdiff_ao.app.zoo.registry import ZOO, zoo_entry
from qdiff_ao.app.zoo.sampling import GuidedDenoiser
from qdiff_ao.app.zoo.shapes import SHAPE_CLASSES, make_shapes


def test_shapes_are_deterministic_in_range_and_cover_every_class() -> None:
    x, y = make_shapes(300, size=16, seed=5)
    x2, y2 = make_shapes(300, size=16, seed=5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (300, 3, 16, 16) and bool(x.abs().max() <= 1)
    assert set(y.tolist()) == set(range(len(SHAPE_CLASSES)))
    assert not torch.equal(make_shapes(4, 16, seed=6)[0], x[:4])
    # The shape stands out from the background: every image spans a visible range.
    assert bool(((x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))) > 0.3).all())


@pytest.mark.parametrize("n, size", [(0, 16), (4, 4)])
def test_shapes_reject_bad_sizes(n: int, size: int) -> None:
    with pytest.raises(ValueError, match="must be an int"):
        make_shapes(n, size)


def test_class_tokens_round_trip_and_checks(tmp_path: Path) -> None:
    tokens = ClassTokens(num_classes=3, num_tokens=2, dim=4)
    out = tokens(torch.tensor([0, 3]))
    assert out.shape == (2, 2, 4) and tokens.null_class == 3
    tokens.save(tmp_path)
    loaded = ClassTokens.load(tmp_path)
    assert torch.equal(loaded(torch.tensor([0, 3])), out)
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        tokens(torch.tensor([4]))
    with pytest.raises(FileNotFoundError, match="train_zoo.py"):
        ClassTokens.load(tmp_path / "missing")


@torch.no_grad()
def test_guided_denoiser_combines_the_two_halves() -> None:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                norm_num_groups=8, layers_per_block=1, cross_attention_dim=8, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()
    tokens = ClassTokens(num_classes=2, num_tokens=2, dim=8)
    x = torch.randn(3, 3, 8, 8)
    guided = GuidedDenoiser(unet, tokens, guidance_scale=3.0)(x, 10).sample
    null = unet(x, 10, encoder_hidden_states=tokens(torch.full((3,), 2))).sample
    cond = unet(x, 10, encoder_hidden_states=tokens(torch.tensor([0, 1, 0]))).sample
    torch.testing.assert_close(guided, null + 3.0 * (cond - null), rtol=1e-4, atol=1e-5)


def test_registry_entries_build_and_unknown_names_fail() -> None:
    assert {"shapes32", "shapes16-cond"} <= set(ZOO)
    entry = zoo_entry("shapes32")
    assert entry.scheduler_config["beta_schedule"] == "linear" and entry.scheduler_config["clip_sample"]
    assert entry.unet_config["resnet_time_scale_shift"] == "scale_shift"
    cond = zoo_entry("shapes16-cond")
    assert cond.conditional and cond.scheduler_config["prediction_type"] == "v_prediction"
    with pytest.raises(ValueError, match="known"):
        zoo_entry("cifar")


@pytest.mark.slow
def test_sensitivity_finds_the_late_step_input_problem_of_the_trained_linear_beta_model() -> None:
    """On the trained shapes32 model (linear betas), nobody names conv_in: the measurement finds it."""
    import qdiff_ao
    from qdiff_ao.app.zoo.sampling import load_zoo

    zoo = load_zoo("shapes32")
    calib = qdiff_ao.collect_calibration_data(zoo.unet, zoo.scheduler, num_inference_steps=50, num_timesteps=10,
                                              samples_per_timestep=4, progress=False)
    prepared = qdiff_ao.prepare(zoo.unet, qdiff_ao.QuantConfig(weight_bits=8), calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    report = qdiff_ao.report.sensitivity(prepared, calib, rows_per_timestep=2, kinds=("activation",))
    top = report.ranked()[0]
    assert top.value == "sample" and "conv_in" in top.layers
    assert top.errors[0] == top.worst  # worst at the smallest timestep (the last sampler step)
    assert top.worst > 10 * report.median_worst()
    decision = qdiff_ao.passes.choose_float_layers(prepared, calib)
    assert "conv_in" in decision.layers
