"""Whole diffusers pipelines quantized with their components on a CUDA device (skipped without one).

A user with a GPU calibrates there: ``quantize(pipe)`` runs the pipeline's own sampler (and text encoder) on the
GPU and returns the CPU INT8 UNet, which then samples in a pipeline on the CPU. Each case repeats the run on the
CPU and compares: a tensor made on the wrong device fails, a stage silently skipped or fed other data shows up as
a different error. CI has no GPU; these run on the lent GPU machine (README, "GPU"). ``_unconditional_case`` and
``_text_to_image_case`` take the device, so they also run on the CPU by hand (``device="cpu"``).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import qdiff_ao
from tests.distributed_worker import RECON, eps_error
from tests.unet_factory import build_unet

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

COLLECT = dict(num_inference_steps=6, num_timesteps=3, samples_per_timestep=8, batch_size=4, seed=3, progress=False)


def _cfg() -> qdiff_ao.QuantConfig:
    return qdiff_ao.QuantConfig(reconstruction=qdiff_ao.ReconstructionConfig(**RECON))


def _device_of(module: torch.nn.Module) -> str:
    return next(module.parameters()).device.type


def _unconditional_case(device: str) -> tuple[float, float]:
    """(eps error of the CPU-calibrated model, of the ``device``-calibrated one); checks deployment on the way."""
    from diffusers import DDIMPipeline, DDIMScheduler

    pipe = DDIMPipeline(unet=build_unet("attn"), scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    on_cpu = qdiff_ao.quantize(copy.deepcopy(pipe), cfg=_cfg(), **COLLECT)
    moved = copy.deepcopy(pipe).to(device)
    on_device = qdiff_ao.quantize(moved, cfg=_cfg(), **COLLECT)
    assert _device_of(moved.unet) == device  # the user's pipeline is left where it was
    assert on_device.quantization_info["reconstruction"] is not None
    # Deploy: with the INT8 UNet as its only module the pipeline's execution device is the CPU.
    moved.unet = on_device
    images = moved(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                   output_type="np").images
    assert images.shape == (2, 16, 16, 3) and np.isfinite(images).all()
    return eps_error(on_cpu)[0], eps_error(on_device)[0]


def _conditional_error(qunet: Any, unet: torch.nn.Module, hidden: int, tokens: int) -> float:
    """Mean relative error of the quantized noise prediction vs the float UNet (CPU) at three timesteps."""
    g = torch.Generator().manual_seed(7)
    errors = []
    for t in (900, 500, 50):
        x = {"sample": torch.randn(4, 4, 8, 8, generator=g), "timestep": torch.full((4,), t),
             "encoder_hidden_states": torch.randn(4, tokens, hidden, generator=g)}
        with torch.no_grad():
            ref = unet(**x).sample
            errors.append(float((qunet(**x).sample - ref).norm() / ref.norm()))
    return sum(errors) / len(errors)


def _text_to_image_case(device: str, folder: Path) -> tuple[float, float]:
    """The Stable-Diffusion-shaped pipeline (CLIP text encoder, VAE, cross-attention UNet, guidance) calibrated
    on ``device``; returns (error of the CPU-calibrated model, of the ``device``-calibrated one)."""
    from diffusers import DiffusionPipeline

    from tests.pipeline_factory import MAX_TOKENS, save_text_to_image_pipeline

    save_text_to_image_pipeline(folder)
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    unet = copy.deepcopy(pipe.unet).eval()
    prompts = dict(prompts=["a red square", "two blue dots", "a green line", "one star"], guidance_scale=7.5)
    on_cpu = qdiff_ao.quantize(copy.deepcopy(pipe), cfg=_cfg(), **prompts, **COLLECT)
    pipe.to(device)
    on_device = qdiff_ao.quantize(pipe, cfg=_cfg(), **prompts, **COLLECT)
    assert _device_of(pipe.unet) == device and _device_of(pipe.text_encoder) == device
    assert on_device.quantization_info["reconstruction"] is not None
    pipe.unet = on_device
    if device != "cpu":  # latents made on the VAE's / text encoder's device reach the CPU kernels: a clear error
        with pytest.raises(ValueError, match="INT8 kernels on the CPU, but sample is on cuda"):
            pipe("a red square", num_inference_steps=2, height=16, width=16)
        pipe.to("cpu")
    images = pipe("a red square", num_inference_steps=3, height=16, width=16, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    hidden = unet.config.cross_attention_dim
    return (_conditional_error(on_cpu, unet, hidden, MAX_TOKENS),
            _conditional_error(on_device, unet, hidden, MAX_TOKENS))


def test_unconditional_pipeline_quantized_on_cuda() -> None:
    err_cpu, err_gpu = _unconditional_case("cuda")
    print(f"unconditional pipeline, eps error vs FP: cpu run {err_cpu:.4f}, cuda run {err_gpu:.4f}")
    assert err_gpu < 1.25 * err_cpu + 0.01


def test_text_to_image_pipeline_quantized_on_cuda(tmp_path: Path) -> None:
    err_cpu, err_gpu = _text_to_image_case("cuda", tmp_path / "sd")
    print(f"text-to-image pipeline, eps error vs FP: cpu run {err_cpu:.4f}, cuda run {err_gpu:.4f}")
    assert err_gpu < 1.25 * err_cpu + 0.01


@pytest.mark.parametrize("kind", ["unconditional", "text-to-image"])
def test_cli_calibrates_on_cuda(tmp_path: Path, kind: str) -> None:
    """``qdiff-ao quantize --device cuda``: the float model is calibrated on the GPU (memory was allocated there),
    the report says so, and the output pipeline folder loads and samples on the CPU."""
    import json

    from diffusers import DiffusionPipeline

    from qdiff_ao.app.cli import main
    from tests.pipeline_factory import save_text_to_image_pipeline, save_unconditional_pipeline

    save = save_unconditional_pipeline if kind == "unconditional" else save_text_to_image_pipeline
    source = save(tmp_path / "model")
    torch.cuda.reset_peak_memory_stats()
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(source), "--out", str(out), "--device", "cuda", "--calibration-steps",
                 "6", "--calibration-timesteps", "3", "--samples-per-timestep", "2", "--recon-iters", "10",
                 "--num-samples", "2", "--sampling-steps", "3", "--quiet"]) == 0
    assert torch.cuda.max_memory_allocated() > 0
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_device"] == "cuda"
    pipe = DiffusionPipeline.from_pretrained(str(out / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0))
    images = pipe(batch_size=1, **call).images if kind == "unconditional" else pipe("a red square", **call).images
    assert np.isfinite(images).all()
