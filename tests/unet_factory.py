"""Tiny diffusers UNets built from config dicts (seeded, no download) for end-to-end tests."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

SMALL_2D: dict[str, Any] = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), norm_num_groups=8,
    layers_per_block=1, attention_head_dim=8,
)

FAMILIES: dict[str, dict[str, Any]] = {
    "attn": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "resnet_updown": dict(down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
                          up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D")),
    "skip_fourier": dict(down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                         up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), time_embedding_type="fourier"),
    "class_embeds": dict(down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"), num_class_embeds=10),
    "cross_attn": {},
}


def build_unet(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if family == "cross_attn":
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            norm_num_groups=8, cross_attention_dim=16, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ).eval()
    return UNet2DModel(**SMALL_2D, **FAMILIES[family]).eval()


def unet_inputs(family: str, batch: int, t: int = 500, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "cross_attn":
        return {"sample": torch.randn(batch, 4, 8, 8, generator=g), "timestep": torch.full((batch,), t),
                "encoder_hidden_states": torch.randn(batch, 4, 16, generator=g)}
    inputs = {"sample": torch.randn(batch, 3, 16, 16, generator=g), "timestep": torch.full((batch,), t)}
    if family == "class_embeds":
        inputs["class_labels"] = torch.randint(0, 10, (batch,), generator=g)
    return inputs


def calibrated_unet(family: str, cfg: Any) -> tuple[torch.nn.Module, torch.fx.GraphModule]:
    """(float UNet, prepared graph) after three calibration batches at t = 900 / 500 / 100."""
    import qdiff_ao

    unet = build_unet(family)
    prepared = qdiff_ao.prepare(unet, cfg, unet_inputs(family, 2))
    with torch.no_grad():
        for i, t in enumerate((900, 500, 100)):
            with qdiff_ao.timestep_context(t):
                prepared(**unet_inputs(family, 4, t=t, seed=10 + i))
    return unet, prepared


def quantize_plain(model: torch.nn.Module, cfg: Any, batches: list[dict[str, torch.Tensor]]) -> torch.fx.GraphModule:
    """prepare -> run every batch (plain calibration, not timestep-grouped) -> convert."""
    import qdiff_ao

    prepared = qdiff_ao.prepare(model, cfg, batches[0])
    with torch.no_grad():
        for batch in batches:
            prepared(**batch)
    return qdiff_ao.convert(prepared)
