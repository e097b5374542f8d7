"""Shared pieces of the benchmarks: model architectures built from configs (no download)."""

from __future__ import annotations

import os
from typing import Any

import torch
from diffusers import UNet2DModel

CIFAR10_DDPM: dict[str, Any] = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)


def cifar10_ddpm_unet(seed: int = 0) -> UNet2DModel:
    """google/ddpm-cifar10-32's architecture (35.7M parameters) with random weights."""
    torch.manual_seed(seed)
    return UNet2DModel(**CIFAR10_DDPM).eval()


def bundled_unet() -> UNet2DModel | None:
    """The project's trained digits DDPM, if its weights are in the package."""
    from qdiff_ao.bundled import DIGITS_DDPM_DIR

    path = os.path.join(DIGITS_DDPM_DIR, "unet")
    if not os.path.isdir(path):
        return None
    return UNet2DModel.from_pretrained(path).eval()
