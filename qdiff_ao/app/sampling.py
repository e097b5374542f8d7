"""Deterministic DDIM sampling from a fixed noise, for side-by-side comparisons of float and quantized UNets.

Every model compared gets the same initial noise ``x_T`` (drawn once from ``seed``) and the same DDIM
schedule with eta = 0, so sample differences come from the models alone.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = ["initial_noise", "ddim_sample", "pipeline_sample"]


def initial_noise(unet: Any, num_samples: int, seed: int) -> torch.Tensor:
    """x_T ~ N(0, I) of shape (num_samples, C, H, W) from the UNet config, drawn from ``seed``."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    c, s = unet.config.in_channels, unet.config.sample_size
    size = (s, s) if isinstance(s, int) else tuple(s)
    return torch.randn(num_samples, c, *size, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def ddim_sample(
    unet: Any,
    scheduler_config: Any,
    noise: torch.Tensor,
    *,
    num_inference_steps: int = 50,
    batch_size: int = 64,
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Run DDIM (eta = 0) from ``noise``; returns samples clipped to [-1, 1], shape like ``noise``.

    Args:
        unet: a diffusers UNet or a :class:`qdiff_ao.QuantizedUNet` (called as ``unet(x, t).sample``).
        scheduler_config: any diffusers scheduler's ``config`` (DDIM is built from it).
        noise: the initial x_T.
    """
    from diffusers import DDIMScheduler

    out = []
    chunks = noise.split(batch_size)
    bar = tqdm(total=len(chunks) * num_inference_steps, desc=desc, disable=not progress, leave=False)
    for x in chunks:
        scheduler = DDIMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(num_inference_steps)
        for t in scheduler.timesteps:
            eps = unet(x, t).sample
            x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            bar.update(1)
        out.append(x.clamp(-1, 1))
    bar.close()
    return torch.cat(out)


@torch.no_grad()
def pipeline_sample(
    pipeline: Any,
    prompts: list[str],
    *,
    seed: int,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt: str | None = None,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Images in [0, 1], shape (len(prompts), 3, H, W), from a text-to-image pipeline, one per prompt.

    Chunk ``k`` draws its initial latents from ``torch.Generator().manual_seed(seed + k)``, so two pipelines
    differing only in their UNet start every image from the same noise.
    """
    images = []
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    for k, chunk in enumerate(tqdm(chunks, desc=desc, disable=not progress, leave=False)):
        out = pipeline(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                       generator=torch.Generator().manual_seed(seed + k), output_type="pt")
        images.append(out.images.float().clamp(0, 1))
    return torch.cat(images)
