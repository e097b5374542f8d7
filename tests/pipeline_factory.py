"""Tiny diffusers pipeline folders built from configs (seeded, no download) for the pipeline-in/out tests.

The text-to-image pipeline is Stable-Diffusion-shaped: a VAE, a CLIP text encoder with 2 layers of width 32, a
CLIP tokenizer over a vocabulary written here (the 26 letters, as word pieces and word ends), a cross-attention
``UNet2DConditionModel`` and a DDIM scheduler; no safety checker.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMPipeline, StableDiffusionPipeline, UNet2DConditionModel

from tests.unet_factory import build_unet

MAX_TOKENS = 16


def save_unconditional_pipeline(folder: Path) -> Path:
    """A DDPMPipeline folder (model_index.json, unet/, scheduler/) with the tiny attention UNet."""
    DDPMPipeline(unet=build_unet("attn"), scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(folder)
    return folder


def _tokenizer(folder: Path) -> object:
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in string.ascii_lowercase:
        vocab[letter] = len(vocab)
        vocab[letter + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")  # no merges: every word is spelled letter by letter
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)


def save_text_to_image_pipeline(folder: Path, seed: int = 0) -> Path:
    """A StableDiffusionPipeline folder with every component tiny (8x8 latents of 4 channels, 16x16 images)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tokenizer(folder.parent / f".{folder.name}-vocab")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=2 + 2 * 26, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )).eval()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=16,
    ).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
