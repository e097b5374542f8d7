"""Cost of QuantizedUNet's NaN/Inf input check at batch 1, measured as a ratio in one run.

    python benchmarks/input_check_cost.py [--rounds 80] [--calls 20] [--threads 2]

Quantizes the bundled digits DDPM (W4A8, no reconstruction: speed does not depend on it), freezes it, and times
interleaved rounds of ``--calls`` forwards with ``check_finite`` on and off; prints the median ratio and the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import qdiff_ao  # noqa: E402
from qdiff_ao.app.bundled import DIGITS_DDPM_DIR  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=80)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet = UNet2DModel.from_pretrained(str(DIGITS_DDPM_DIR / "unet")).eval()
    calib = qdiff_ao.CalibrationSet(torch.randn(8, 1, 16, 16), torch.tensor([900] * 4 + [100] * 4))
    qunet = qdiff_ao.quantize(unet, DDIMScheduler(), qdiff_ao.QuantConfig(), calib=calib, reconstruct=False,
                              progress=False).optimize_for_inference()
    x, t = torch.randn(1, 1, 16, 16), torch.tensor([500])
    ratios = []
    with torch.no_grad():
        for _ in range(args.rounds):
            seconds = {}
            for flag in (True, False):
                qunet.check_finite = flag
                start = time.perf_counter()
                for _ in range(args.calls):
                    qunet(x, t)
                seconds[flag] = time.perf_counter() - start
            ratios.append(seconds[True] / seconds[False])
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    print(f"batch 1, frozen W4A8: time(check on) / time(check off) = {statistics.median(ratios):.4f} (median of "
          f"{args.rounds} interleaved rounds of {args.calls} calls; quartiles "
          f"{statistics.quantiles(ratios, n=4)[0]:.4f} / {statistics.quantiles(ratios, n=4)[2]:.4f})")


if __name__ == "__main__":
    main()
