"""Shared pieces of the checkpoint tests: tiny UNets, quantization schemes and a re-signing checkpoint editor."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

import qdiff_ao
from qdiff_ao.deploy.checkpoint.files import read_checkpoint, write_checkpoint
from tests.unet_factory import quantize_plain

SCHEMES = {"W8A8": (8, 8, 8), "W4A8": (4, 8, 8), "W4A8s16": (4, 8, 16), "W4A32": (4, None, 8)}


def _unet(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "cond":
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
        ).eval()
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4,
    ).eval()


def _inputs(arch: str, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    timestep = torch.randint(0, 1000, (batch,), generator=g)
    if arch == "cond":
        return {"sample": torch.randn(batch, 4, 8, 8, generator=g), "timestep": timestep,
                "encoder_hidden_states": torch.randn(batch, 5, 16, generator=g)}
    return {"sample": torch.randn(batch, 1, 8, 8, generator=g), "timestep": timestep}


def _quantize(arch: str, scheme: str, **overrides: Any) -> tuple[torch.nn.Module, qdiff_ao.QuantizedUNet]:
    weight_bits, act_bits, softmax_bits = SCHEMES[scheme]
    kwargs = dict(weight_bits=weight_bits, act_bits=act_bits, softmax_bits=softmax_bits, range_method="minmax")
    cfg = qdiff_ao.QuantConfig(**{**kwargs, **overrides})
    unet = _unet(arch)
    gm = quantize_plain(unet, cfg, [_inputs(arch, 2, 1), _inputs(arch, 2, 2)])
    return unet, qdiff_ao.QuantizedUNet(gm, like=unet)


def _out(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def _copy(src: Path, dst_parent: Path) -> Path:
    return Path(shutil.copytree(src, dst_parent / "copy"))


def _resign(src: Path, dst: Path, *, body: dict[str, Any] | None = None, tensors: dict[str, torch.Tensor] | None = None,
            edit: Callable[[dict[str, Any], dict[str, torch.Tensor]], None] | None = None) -> Path:
    """Rewrite a checkpoint with edited content but valid hashes (to reach the checks after the integrity ones)."""
    body0, tensors0 = read_checkpoint(src)
    body = {k: v for k, v in (body or body0).items() if k not in ("tensors_bytes", "tensors_sha256")}
    tensors = dict(tensors or tensors0)
    if edit is not None:
        edit(body, tensors)
    return write_checkpoint(dst, body, tensors, overwrite=False)
