"""The model zoo: small trained diffusion models that differ from the bundled digits model in character.

Each entry names a diffusers UNet configuration, a scheduler configuration and the procedural data it is trained
on (:mod:`qdiff_ao.app.zoo.shapes`). ``examples/train_zoo.py`` trains an entry and writes its folder
(``unet/``, ``scheduler/``, and for class-conditional models ``class_tokens.safetensors``) under
:data:`ZOO_DIR`; ``examples/train_zoo_classifier.py`` trains the classifier behind its FD yardstick.

- ``shapes32``: RGB 32x32 unconditional DDPM, linear betas with ``clip_sample``, ``scale_shift`` time
  conditioning, ResnetDownsample / ResnetUpsample blocks and an attention level at 8x8 -- the late-step regime where
  the image noise near ``t = 0`` is far below an 8-bit step of the early-step input range.
- ``shapes16-cond``: class-conditional ``UNet2DConditionModel`` on RGB 16x16 (class -> learned token
  embeddings as ``encoder_hidden_states``, cross-attention, classifier-free guidance at sampling,
  ``prediction_type="v_prediction"``, scaled-linear betas): the Stable-Diffusion path with trained weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ZOO", "ZOO_DIR", "ZooEntry", "zoo_entry"]

ZOO_DIR = Path(__file__).resolve().parent
"""Folder holding the trained zoo models (one sub-folder per entry)."""


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: what it is built from and how it is trained and sampled."""

    name: str
    unet_class: str
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    image_size: int
    num_classes: int = 0
    """> 0 for class-conditional models (class tokens fed as ``encoder_hidden_states``)."""
    num_tokens: int = 4
    guidance_scale: float = 1.0
    train_steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-3
    notes: str = field(default="", compare=False)

    @property
    def folder(self) -> Path:
        """The entry's model folder under :data:`ZOO_DIR`."""
        return ZOO_DIR / self.name

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0


_SHAPES32 = ZooEntry(
    name="shapes32",
    unet_class="UNet2DModel",
    unet_config=dict(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 48, 64), norm_num_groups=8, attention_head_dim=16,
        down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
    ),
    scheduler_config=dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                          prediction_type="epsilon", clip_sample=True, clip_sample_range=1.0),
    image_size=32,
    train_steps=3500,
    batch_size=32,
    notes="RGB 32x32 shapes, linear betas, clip_sample, scale_shift, resnet down/upsampling, attention at 16x16",
)

_SHAPES16_COND = ZooEntry(
    name="shapes16-cond",
    unet_class="UNet2DConditionModel",
    unet_config=dict(
        sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=8, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ),
    scheduler_config=dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type="v_prediction", clip_sample=False),
    image_size=16,
    num_classes=6,
    guidance_scale=3.0,
    train_steps=3000,
    notes="class-conditional RGB 16x16 shapes, v-prediction, cross-attention to 4 class tokens, CFG 3.0",
)

ZOO: dict[str, ZooEntry] = {e.name: e for e in (_SHAPES32, _SHAPES16_COND)}
"""All zoo entries by name."""


def zoo_entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in ZOO:
        raise ValueError(f"unknown zoo model {name!r}; known: {sorted(ZOO)}")
    return ZOO[name]
