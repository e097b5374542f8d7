"""Shared pieces of the tracing tests: small UNet configs of every block family, inputs, eager reference."""

from __future__ import annotations

import collections
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from torch import fx, nn

ATOL = 1e-5
TRACE_BATCH, CHECK_BATCH = 1, 3

_SMALL = {
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (32, 64),
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "attention_head_dim": 8,
}
# Every 2D block family UNet2DModel accepts, both time embeddings, class conditioning, resnet
# up/down sampling and a UNet without mid block. Skip blocks fix their own GroupNorm groups
# (min(channels // 4, 32)), which 32/64 channels satisfy.
UNET2D_CONFIGS: dict[str, dict[str, Any]] = {
    "down_attn": {
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    },
    "resnet_sampling_scale_shift": {
        "down_block_types": ("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
        "resnet_time_scale_shift": "scale_shift",
    },
    "skip_fourier": {
        "down_block_types": ("SkipDownBlock2D", "AttnSkipDownBlock2D"),
        "up_block_types": ("AttnSkipUpBlock2D", "SkipUpBlock2D"),
        "time_embedding_type": "fourier",
    },
    "class_embeds": {
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
        "num_class_embeds": 10,
    },
    "attn_resnet_updown_no_mid": {
        "down_block_types": ("AttnDownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D"),
        "downsample_type": "resnet",
        "upsample_type": "resnet",
        "mid_block_type": None,
    },
}
COND_CONFIG: dict[str, Any] = {  # SD-1.x layout at reduced width
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "norm_num_groups": 8,
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
ALL_CONFIGS = [*UNET2D_CONFIGS, "cross_attn_cond"]


def _set_processor(unet: nn.Module, processor: str) -> int:
    """Install the attention processor; return the number of Attention modules."""
    attns = [m for m in unet.modules() if isinstance(m, Attention)]
    if processor == "classic":
        for attn in attns:  # UNet2DModel has no set_attn_processor in diffusers 0.42
            attn.set_processor(AttnProcessor())
    else:
        assert all(isinstance(a.processor, AttnProcessor2_0) for a in attns)
    return len(attns)


def _build(name: str, processor: str = "sdpa") -> tuple[nn.Module, int]:
    torch.manual_seed(0)
    if name == "cross_attn_cond":
        unet: nn.Module = UNet2DConditionModel(**COND_CONFIG)
    else:
        unet = UNet2DModel(**{**_SMALL, **UNET2D_CONFIGS[name]})
    return unet.eval(), _set_processor(unet, processor)


def _inputs(name: str, batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    channels = 4 if name == "cross_attn_cond" else 3
    inputs = {"sample": torch.randn(batch, channels, 16, 16, generator=g)}
    t = torch.randint(0, 1000, (batch,), generator=g)
    inputs["timestep"] = t.float() if UNET2D_CONFIGS.get(name, {}).get("time_embedding_type") == "fourier" else t
    if name == "cross_attn_cond":
        inputs["encoder_hidden_states"] = torch.randn(batch, 7, 32, generator=g)
    if name == "class_embeds":
        inputs["class_labels"] = torch.randint(0, 10, (batch,), generator=g)
    return inputs


def _eager(unet: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def _targets(gm: fx.GraphModule) -> collections.Counter:
    return collections.Counter(n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
