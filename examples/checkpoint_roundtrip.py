"""Quantize a DDPM UNet, save a compressed checkpoint, reload it without the FP weights, sample with both.

    python examples/checkpoint_roundtrip.py                                  # tiny random UNet, W4A8, < 1 min
    python examples/checkpoint_roundtrip.py --unet qdiff_ao/app/bundled/digits-ddpm/unet --weight-bits 8

Steps: Q-Diffusion calibration data from the FP DDIM sampler -> prepare -> calibrate -> convert ->
``QuantizedUNet.save_pretrained`` -> ``QuantizedUNet.from_pretrained`` -> DDIM sampling with the in-memory and the
reloaded model from the same generator. The images are bit-identical; the script prints the sizes of the
FP32 safetensors and of the checkpoint.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMPipeline, DDIMScheduler, UNet2DModel

import qdiff_ao

logger = logging.getLogger("checkpoint_roundtrip")


def tiny_unet(seed: int) -> UNet2DModel:
    """A small random UNet2DModel with an attention level and skip concats (what Q-Diffusion targets)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64), norm_num_groups=8,
        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
    ).eval()


def quantize(unet: UNet2DModel, scheduler: DDIMScheduler, args: argparse.Namespace) -> qdiff_ao.QuantizedUNet:
    """Timestep-uniform calibration (Q-Diffusion Sec. 4.1) and lowering to integer kernels."""
    calib = qdiff_ao.collect_calibration_data(
        unet, scheduler, num_inference_steps=args.steps, num_timesteps=min(5, args.steps),
        samples_per_timestep=args.calib_samples, batch_size=args.calib_samples, progress=False,
    )
    cfg = qdiff_ao.QuantConfig(weight_bits=args.weight_bits, act_bits=None if args.weights_only else 8,
                               range_method=args.range_method)
    prepared = qdiff_ao.prepare(unet, cfg, calib.example_inputs(batch_size=2))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    return qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)


def sample(pipe: DDIMPipeline, unet: torch.nn.Module, args: argparse.Namespace) -> np.ndarray:
    pipe.unet = unet
    out = pipe(batch_size=args.batch, generator=torch.Generator().manual_seed(args.seed),
               num_inference_steps=args.steps, output_type="np")
    return out.images


def folder_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unet", type=Path, help="a diffusers UNet2DModel folder (default: a tiny random UNet)")
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--weights-only", action="store_true", help="W?A32: float activations")
    parser.add_argument("--range-method", default="minmax", choices=["minmax", "lp"])
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps for calibration and sampling")
    parser.add_argument("--calib-samples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where to keep the checkpoint (default: a temporary folder)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)

    unet = UNet2DModel.from_pretrained(args.unet).eval() if args.unet else tiny_unet(args.seed)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    quantized = quantize(unet, scheduler, args)

    with tempfile.TemporaryDirectory() as tmp:
        target = args.out or Path(tmp) / "checkpoint"
        quantized.save_pretrained(target, overwrite=args.out is not None)
        unet.save_pretrained(Path(tmp) / "fp32", safe_serialization=True)
        fp32 = folder_bytes(Path(tmp) / "fp32", "*.safetensors")
        ours = folder_bytes(target, "*")
        reloaded = qdiff_ao.QuantizedUNet.from_pretrained(target)  # rebuilt from config.json + model.safetensors

    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        before, after = sample(pipe, quantized, args), sample(pipe, reloaded, args)
    logger.info("FP32 safetensors: %.1f KiB, %s checkpoint: %.1f KiB (%.3fx)", fp32 / 1024,
                qdiff_ao.graph_info(quantized.graph_module).config.name, ours / 1024, ours / fp32)
    logger.info("images %s, bit-identical after reload: %s", before.shape, bool(np.array_equal(before, after)))


if __name__ == "__main__":
    main()
