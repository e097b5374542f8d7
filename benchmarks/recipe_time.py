"""Wall time of the whole default recipe, ``qdiff_ao.quantize`` with nothing changed, on the CIFAR-10-size UNet.

    python benchmarks/recipe_time.py [--threads 2] [--bits W4A8|W8A8]

The UNet is google/ddpm-cifar10-32's configuration (``benchmarks.common.cifar10_ddpm_unet``, 35.7M parameters)
with random weights and that model's scheduler settings (DDPM, 1,000 linear betas). Random weights time the
recipe fairly: iteration counts and sampler runs are fixed; only the precision fallback's measured choices (how
many layers it tries and keeps in float) can differ on a trained model. Everything ``quantize`` does by default
runs: calibration data from the float sampler (100 inference steps, 20 timesteps x 64 samples), calibration, the
measured precision fallback, reconstruction with its choice, timestep groups, output and spread corrections,
conversion. The table is ``quantization_info["timings"]`` (seconds per step, measured inside ``quantize``) and the
total wall time around the call. Issue #15 asks for the total to stay <= 30 min on this 2-core CPU.
(``benchmarks/reconstruction.py`` part 3 times calibration and reconstruction alone, on a smaller calibration set.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import cifar10_ddpm_unet  # noqa: E402
from benchmarks.machine import cpu_flags  # noqa: E402

_BITS = {"W4A8": (4, 8), "W8A8": (8, 8)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--bits", choices=sorted(_BITS), default="W4A8")
    ap.add_argument("--progress", action="store_true", help="quantize's progress bars")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    weight_bits, act_bits = _BITS[args.bits]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"flags: {cpu_flags()}")
    unet = cifar10_ddpm_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    cfg = qdiff_ao.QuantConfig(weight_bits=weight_bits, act_bits=act_bits)
    t0 = time.perf_counter()
    qunet = qdiff_ao.quantize(unet, scheduler=scheduler, cfg=cfg, progress=args.progress)
    total = time.perf_counter() - t0
    timings = qunet.quantization_info["timings"]
    print(f"\nquantize() defaults, {args.bits}, CIFAR-10-size UNet (random weights), "
          f"{qunet.quantization_info['calibration_samples']} calibration rows")
    print("| step | s | min |\n|---|---:|---:|")
    for name, seconds in timings.items():
        print(f"| {name.removesuffix('_s')} | {seconds:.1f} | {seconds / 60:.2f} |")
    print(f"| **total (wall, around the call)** | {total:.1f} | **{total / 60:.2f}** |")
    fallback = qunet.quantization_info.get("precision_fallback") or {}
    if fallback:
        # each round that keeps new layers prepares the graph again (and calibrates it again only when its observer
        # statistics could not be copied over: "recalibrations"); its cost is in this step's time
        print(f"precision fallback: {fallback.get('rounds')} rounds ({fallback.get('recalibrations')} calibrated "
              f"again), {fallback.get('forwards')} simulation forwards, "
              f"{len(fallback.get('harmful', []))} harmful quantizers, {len(fallback.get('layers', []))} layers kept "
              f"in float ({100 * fallback.get('macs_fraction', 0.0):.2f}% of MACs): {fallback.get('layers')}")
    recon = qunet.quantization_info.get("reconstruction") or {}
    if recon:
        blocks = recon["blocks"].values()
        # a kept run B reports its own reconstruct() call (the final stage only) but every block, A's included
        print(f"reconstruction (the kept run's report): {recon['num_samples']} cached rows; summed over every block: "
              f"AdaRound {sum(b.get('weight_seconds', 0.0) for b in blocks):.1f} s, step sizes "
              f"{sum(b.get('act_seconds', 0.0) for b in blocks):.1f} s; the kept run's own reconstruct() call "
              f"{recon['seconds']:.1f} s (run B learns only the final decoder stage)")
    choice = recon.get("choice")
    if choice:
        print(f"reconstruction choice: kept {choice.get('kept')!r}")


if __name__ == "__main__":
    main()
