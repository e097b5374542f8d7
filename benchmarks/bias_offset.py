"""The offset in the quantized noise prediction, and what output bias correction does to it (bundled model).

    python benchmarks/bias_offset.py [--recon-iters 100] [--num-samples 300] [--out docs/figures/eps_offset.png]

For W4A8 with and without split shortcuts: calibrate (20 uniform timesteps x 16 samples of a 100-step DDIM run),
reconstruct, then convert twice from the same reconstructed graph — once as is and once after
``passes.correct_output_bias`` — so the correction is the only difference. Prints, per variant, the mean signed
noise-prediction offset and the relative error along the FP DDIM trajectory (25 steps, 64 samples), the image
mean and the digits FD of --num-samples images (DDIM 50 steps, one seed, same noise for all), and plots the
per-step offset.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from qdiff_ao.app.metrics import DigitsFD, noise_prediction_error, noise_prediction_offset  # noqa: E402
from qdiff_ao.app.model_source import load_model_folder  # noqa: E402
from qdiff_ao.app.sampling import ddim_sample, initial_noise  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recon-iters", type=int, default=100)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--out", default="docs/figures/eps_offset.png")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet, scheduler, _ = load_model_folder(None)
    metric = DigitsFD.from_bundled()
    calib = qdiff_ao.collect_calibration_data(unet, scheduler, num_inference_steps=100, num_timesteps=20,
                                              samples_per_timestep=16, progress=False)
    noise = initial_noise(unet, args.num_samples, seed=0)
    rcfg = qdiff_ao.ReconstructionConfig(weight_iters=args.recon_iters, act_iters=args.recon_iters // 2)
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8, reconstruction=rcfg)
    traj = dict(num_samples=64, num_inference_steps=25, sample_shape=(1, 16, 16), seed=0)
    curves: dict[str, torch.Tensor] = {}
    fp_images = ddim_sample(unet, scheduler.config, noise, num_inference_steps=50, batch_size=100, progress=False)
    print(f"FP32: image mean {fp_images.mean():+.4f}, FD {metric.fd(fp_images):.1f}")
    print("\n| variant | mean eps offset | rel. eps error | image mean | digits FD |\n|---|---:|---:|---:|---:|")
    for split in (True, False):
        prepared = qdiff_ao.prepare(unet, cfg, calib.example_inputs(2), split=split)
        qdiff_ao.calibrate(prepared, calib, progress=False)
        qdiff_ao.passes.reconstruct(prepared, calib, rcfg, model=unet, progress=False)
        for corrected in (False, True):
            if corrected:
                qdiff_ao.passes.correct_output_bias(prepared, calib, unet)
            qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
            qunet.optimize_for_inference()
            label = f"W4A8{'' if split else ', no split'}{', bias corrected' if corrected else ''}"
            offset = noise_prediction_offset(unet, qunet, scheduler, **traj)[:, 0]
            err = noise_prediction_error(unet, qunet, scheduler, **traj)
            images = ddim_sample(qunet, scheduler.config, noise, num_inference_steps=50, batch_size=100,
                                 progress=False)
            curves[label] = offset
            print(f"| {label} | {offset.mean():+.4f} | {err.mean():.4f} | {images.mean():+.4f} | "
                  f"{metric.fd(images):.1f} |", flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for label, offset in curves.items():
        ax.plot(range(len(offset)), offset.numpy(), marker="o", ms=3, label=label,
                linestyle="-" if "corrected" in label else "--")
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("DDIM step (noisiest first)")
    ax.set_ylabel("mean(eps_q - eps_fp)")
    ax.set_title("W4A8 noise-prediction offset along the FP DDIM trajectory (digits DDPM)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
