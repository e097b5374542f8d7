"""Small UNet, inputs and calibration sets shared by the quality-mechanism tests (test_quality_passes,
test_precision_fallback)."""

from __future__ import annotations

import torch
from torch import nn

import qdiff_ao
from tests.calibration_helpers import tiny_unet

SHAPE = (3, 8, 8)


def build_unet() -> nn.Module:
    return tiny_unet(sample_size=SHAPE[-1])


def unet_inputs(batch: int, t: int = 500, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"sample": torch.randn(batch, *SHAPE, generator=g), "timestep": torch.full((batch,), t)}


def late_step_calib(rows: int = 8) -> qdiff_ao.CalibrationSet:
    """Early steps with |x_t| ~ 4, late steps with |x_t| ~ 0.01: the linear-beta regime in which an 8-bit input grid
    set by the early steps cannot see the late steps' input at all."""
    g = torch.Generator().manual_seed(3)
    early = torch.randn(rows, *SHAPE, generator=g) * 4.0
    late = torch.randn(rows, *SHAPE, generator=g) * 0.01
    t = torch.cat([torch.full((rows,), 900), torch.full((rows,), 10)])
    return qdiff_ao.CalibrationSet(torch.cat([early, late]), t)


def benign_calib(rows: int = 8) -> qdiff_ao.CalibrationSet:
    a, b = unet_inputs(rows, t=900, seed=1), unet_inputs(rows, t=10, seed=2)
    return qdiff_ao.CalibrationSet(torch.cat([a["sample"], b["sample"]]), torch.cat([a["timestep"], b["timestep"]]))


def calibrated_prepared(calib: qdiff_ao.CalibrationSet, cfg: qdiff_ao.QuantConfig | None = None
              ) -> tuple[nn.Module, torch.fx.GraphModule]:
    unet = build_unet()
    prepared = qdiff_ao.prepare(unet, cfg or qdiff_ao.QuantConfig(weight_bits=8), calib.example_inputs(1))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    return unet, prepared
