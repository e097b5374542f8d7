"""Show why calibration must be timestep-aware: per-step activation ranges and the split-shortcut halves.

    python examples/calibration_drift.py [--model DIR] [--out-dir drift]

Collects calibration data uniformly over a DDIM trajectory, calibrates timestep-aware observers, prints the most
drifting layers and writes two figures: per-step activation ranges and the histograms of the two halves of the
decoder's skip concats. Without --model a small random UNet2DModel is used (under a minute).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

import qdiff_ao
from qdiff_ao.calibration.range_report import (
    activation_ranges,
    format_ranges_table,
    plot_activation_ranges,
    plot_split_histograms,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="diffusers folder with unet/ and scheduler/")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--out-dir", default="drift")
    args = parser.parse_args()
    if args.model:
        unet = UNet2DModel.from_pretrained(args.model, subfolder="unet").eval()
        scheduler = DDIMScheduler.from_pretrained(args.model, subfolder="scheduler")
    else:
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=16, block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
        scheduler = DDIMScheduler(num_train_timesteps=1000)
    calib = qdiff_ao.collect_calibration_data(unet, scheduler, num_inference_steps=args.steps,
                                              num_timesteps=args.timesteps, samples_per_timestep=8)
    print("calibration timesteps:", calib.timestep_histogram())
    prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(), calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, batch_size=8)
    print(format_ranges_table(activation_ranges(prepared), top=8))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_activation_ranges(prepared, out / "activation_ranges.png")
    plot_split_histograms(prepared, calib.example_inputs(8), out / "split_histograms.png")
    print(f"wrote {out / 'activation_ranges.png'} and {out / 'split_histograms.png'}")


if __name__ == "__main__":
    main()
