"""Memory one calibration row costs block reconstruction, measured on the CIFAR-10 DDPM and Stable Diffusion 1.x
configurations (random weights, built from configs), and what that means per rank.

    python benchmarks/reconstruction_footprint.py [--models cifar10 sd1] [--ranks 1 2 8] [--cache-gib 1 16]

For each model: trace and prepare W4A8, calibrate on one random row, then
``qdiff_ao.passes.reconstruction.cache_bytes_per_row`` (both frontiers of cached block inputs/outputs at the
peak of the block walk; nothing is cached). Prints, for each ``max_cache_bytes`` and number of ranks, the rows
cached per rank and in total, and the calibration set's own bytes per row (x_t, t, conditioning), which every rank
holds unless it keeps shards (``collect_calibration_data(keep_shards=True)``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import cifar10_ddpm_unet  # noqa: E402
from qdiff_ao.passes.reconstruction import cache_bytes_per_row  # noqa: E402

SD1_CONFIG = dict(  # Stable Diffusion 1.x's UNet2DConditionModel (64x64 latents, 4 channels, CLIP-L text states)
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    cross_attention_dim=768, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)


def one_row_set(unet: torch.nn.Module) -> qdiff_ao.CalibrationSet:
    c, s = unet.config.in_channels, unet.config.sample_size
    ehs = None
    if getattr(unet.config, "cross_attention_dim", None) is not None and "Cross" in str(unet.config.down_block_types):
        ehs = torch.randn(1, 77, unet.config.cross_attention_dim)
    return qdiff_ao.CalibrationSet(torch.randn(1, c, s, s), torch.tensor([500]), encoder_hidden_states=ehs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=["cifar10", "sd1"], default=["cifar10", "sd1"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--cache-gib", type=float, nargs="+", default=[1.0, 16.0])
    args = parser.parse_args()
    for name in args.models:
        start = time.perf_counter()
        if name == "cifar10":
            unet = cifar10_ddpm_unet()
        else:
            from diffusers import UNet2DConditionModel

            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SD1_CONFIG).eval()
        calib = one_row_set(unet)
        prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(), calib.example_inputs(1))
        qdiff_ao.calibrate(prepared, calib, progress=False)
        per_row = cache_bytes_per_row(prepared, calib, model=unet)
        params = sum(p.numel() for p in unet.parameters())
        print(f"\n## {name}: {params / 1e6:.1f}M parameters; reconstruction cache {per_row / 2**20:.1f} MiB per "
              f"calibration row (both frontiers, peak of the walk); calibration set "
              f"{calib.bytes_per_sample / 2**10:.0f} KiB per row ({time.perf_counter() - start:.0f} s)\n")
        print("| max_cache_bytes per rank | " + " | ".join(f"{n} rank{'s' if n > 1 else ''}: rows per rank / total"
                                                          for n in args.ranks) + " |")
        print("|---|" + "---|" * len(args.ranks))
        for gib in args.cache_gib:
            per_rank = int(gib * 2**30) // per_row
            print(f"| {gib:g} GiB | " + " | ".join(f"{per_rank} / {per_rank * n}" for n in args.ranks) + " |")
        del unet, prepared


if __name__ == "__main__":
    main()
