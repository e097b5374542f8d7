"""The whole Q-Diffusion recipe in one call: collect -> trace -> split -> prepare -> calibrate -> reconstruct ->
output bias correction -> convert.

Example:
    >>> import qdiff_ao
    >>> from diffusers import DDIMScheduler, UNet2DModel
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    norm_num_groups=4, layers_per_block=1,
    ...                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    ...                    up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    >>> qunet = qdiff_ao.quantize(unet, DDIMScheduler(), qdiff_ao.QuantConfig(), num_inference_steps=4,
    ...                           num_timesteps=2, samples_per_timestep=2, reconstruct=False, progress=False)
    >>> sorted(qunet.quantization_info["calibration_timesteps"])
    [250, 750]
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from qdiff_ao.calibration import calibrate, collect_calibration_data
from qdiff_ao.calibration_set import CalibrationSet
from qdiff_ao.config import QuantConfig
from qdiff_ao.lowering import convert, prepare
from qdiff_ao.report import activation_ranges
from qdiff_ao.unet import QuantizedUNet

__all__ = ["quantize"]

logger = logging.getLogger(__name__)


def quantize(
    unet: nn.Module,
    scheduler: Any,
    cfg: QuantConfig | None = None,
    *,
    num_inference_steps: int = 100,
    num_timesteps: int = 20,
    samples_per_timestep: int = 64,
    calibration_strategy: str = "uniform",
    split: bool = True,
    reconstruct: bool = True,
    bias_correction: bool = True,
    calib: CalibrationSet | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    on_prepared: Any = None,
    **collect_kwargs: Any,
) -> QuantizedUNet:
    """Quantize a diffusers UNet with Q-Diffusion and return a pipeline-ready :class:`QuantizedUNet`.

    Args:
        unet: the float diffusers UNet (left unchanged).
        scheduler: the diffusers scheduler whose trajectory provides calibration data.
        cfg: quantization settings (default W4A8, ``QuantConfig()``); ``cfg.reconstruction`` sets the
            reconstruction iterations.
        num_inference_steps, num_timesteps, samples_per_timestep, calibration_strategy: calibration data
            (see :func:`qdiff_ao.collect_calibration_data`); ignored when ``calib`` is given.
        split: split shortcut quantization.
        reconstruct: BRECQ/AdaRound block reconstruction (``qdiff_ao.passes.reconstruct``).
        bias_correction: fold the mean quantization error of the model output into the output layer's bias
            (``qdiff_ao.passes.correct_output_bias``); needs a quantized output layer (skipped with a warning
            otherwise).
        calib: a ready CalibrationSet.
        batch_size: calibration batch size.
        seed: seed of calibration sampling.
        progress: tqdm bars.
        on_prepared: optional callback ``f(prepared, calib)`` run after calibration and reconstruction,
            before conversion (reports and plots use it).
        **collect_kwargs: forwarded to ``collect_calibration_data`` (e.g. ``encoder_hidden_states``).

    Returns:
        The quantized UNet; ``.quantization_info`` holds timings, the calibration timesteps, the most drifting
        activation ranges and the reconstruction report.
    """
    cfg = cfg or QuantConfig()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if calib is None:
        calib = collect_calibration_data(
            unet, scheduler, num_inference_steps=num_inference_steps, num_timesteps=num_timesteps,
            samples_per_timestep=samples_per_timestep, strategy=calibration_strategy, batch_size=batch_size,
            seed=seed, progress=progress, **collect_kwargs,
        )
    timings["collect_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prepared = prepare(unet, cfg, calib.example_inputs(min(2, len(calib))), split=split)
    timings["trace_prepare_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    calibrate(prepared, calib, batch_size=batch_size, progress=progress)
    timings["calibrate_s"] = time.perf_counter() - t0
    ranges = activation_ranges(prepared)
    recon_report = None
    if reconstruct:
        from qdiff_ao.passes.reconstruct import reconstruct as run_reconstruction

        t0 = time.perf_counter()
        recon_report = run_reconstruction(prepared, calib, cfg.reconstruction, model=unet, progress=progress)
        timings["reconstruct_s"] = time.perf_counter() - t0
    bias_report = None
    if bias_correction:
        from qdiff_ao.passes.bias_correction import correct_output_bias, find_output_layer

        t0 = time.perf_counter()
        try:
            output_layer, _ = find_output_layer(prepared)
        except ValueError as err:
            logger.warning("output bias correction skipped: %s", err)
        else:
            bias_report = correct_output_bias(prepared, calib, unet, layer=output_layer, batch_size=batch_size)
            timings["bias_correction_s"] = time.perf_counter() - t0
    if on_prepared is not None:
        on_prepared(prepared, calib)
    t0 = time.perf_counter()
    splits = list(prepared.meta.get("qdiff_splits", []))
    quantized = convert(prepared, cfg)
    timings["convert_s"] = time.perf_counter() - t0
    qunet = QuantizedUNet(quantized, like=unet)
    qunet.quantization_info = {
        "config": cfg.to_dict(),
        "timings": timings,
        "calibration_timesteps": calib.timesteps(),
        "calibration_samples": len(calib),
        "splits": splits,
        "most_drifting": [{"value": r["value"], "drift": r["drift"]} for r in ranges[:10]],
        "reconstruction": recon_report,
        "bias_correction": bias_report,
    }
    with torch.no_grad():
        qunet(**calib.example_inputs(1))  # fail here, not in the user's pipeline, if anything is off
    return qunet
