"""Shared helpers of the calibration tests: tiny UNets built from configs and a short collection run."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.collection import collect_calibration_data

STEPS = 10


def tiny_unet(sample_size: int = 8) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).eval()


def tiny_cond_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        norm_num_groups=8,
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()


def collect(model, scheduler=None, **kwargs) -> CalibrationSet:
    args = {
        "num_inference_steps": STEPS,
        "num_timesteps": 5,
        "samples_per_timestep": 3,
        "batch_size": 2,
        "progress": False,
    }
    return collect_calibration_data(model, scheduler, **{**args, **kwargs})


def count_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def sched_timesteps(scheduler) -> torch.Tensor:
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(STEPS)
    return copy.timesteps
