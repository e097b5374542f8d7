"""The paper's table on the bundled digits DDPM: FP32 vs naive PTQ vs Q-Diffusion (ours), with ablations.

    python benchmarks/quality.py [--seeds 3] [--num-samples 300] [--steps 50] [--recon-iters N] [--out docs/quality]

Every row samples with the same sampler (DDIM, --steps steps, eta 0) from the same initial noise per seed.
Columns: digits FD (Frechet distance of classifier features to held-out real digits; an FID analogue, see
qdiff_ao.app.metrics) as mean ± std over seeds, mean classifier confidence, mean relative noise-prediction error along
the FP DDIM trajectory, checkpoint size, latency ratio vs FP32 (batch 8, median of interleaved rounds).

Rows: FP32; naive PTQ at W8A8 / W4A8 (min/max observers, no split, no timestep-aware statistics, calibration on a
single step: x_T, the first step of the trajectory, no reconstruction, no bias correction); Q-Diffusion (ours)
at W8A8, W4A8 and weights-only W4 (uniform calibration over the trajectory, Lp range search, split shortcuts,
reconstruction, output bias correction); ablations of ours at W4A8: no split, calibration on the first / last
steps only, no reconstruction, no output bias correction.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from qdiff_ao.app.main_job import load_model_folder, speed_ratio  # noqa: E402
from qdiff_ao.app.metrics import DigitsFD, noise_prediction_error  # noqa: E402
from qdiff_ao.app.sampling import ddim_sample, initial_noise  # noqa: E402


def rows(recon: qdiff_ao.ReconstructionConfig) -> list[dict[str, Any]]:
    naive = dict(range_method="minmax", timestep_aware=False)
    return [
        dict(label="naive PTQ W8A8", cfg=qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, **naive), split=False,
             calib="single", recon=False, bias=False),
        dict(label="naive PTQ W4A8", cfg=qdiff_ao.QuantConfig(weight_bits=4, act_bits=8, **naive), split=False,
             calib="single", recon=False, bias=False),
        dict(label="Q-Diffusion W8A8", cfg=qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, reconstruction=recon),
             split=True, calib="uniform", recon=True, bias=True),
        dict(label="Q-Diffusion W4A8", cfg=qdiff_ao.QuantConfig(weight_bits=4, act_bits=8, reconstruction=recon),
             split=True, calib="uniform", recon=True, bias=True),
        dict(label="Q-Diffusion W4A32 (weights only)",
             cfg=qdiff_ao.QuantConfig(weight_bits=4, act_bits=None, reconstruction=recon), split=True,
             calib="uniform", recon=True, bias=True),
        dict(label="ours W4A8, no split", cfg=qdiff_ao.QuantConfig(reconstruction=recon), split=False,
             calib="uniform", recon=True, bias=True),
        dict(label="ours W4A8, first-steps calibration", cfg=qdiff_ao.QuantConfig(reconstruction=recon),
             split=True, calib="first", recon=True, bias=True),
        dict(label="ours W4A8, last-steps calibration", cfg=qdiff_ao.QuantConfig(reconstruction=recon),
             split=True, calib="last", recon=True, bias=True),
        dict(label="ours W4A8, no reconstruction", cfg=qdiff_ao.QuantConfig(), split=True, calib="uniform",
             recon=False, bias=True),
        dict(label="ours W4A8, no bias correction", cfg=qdiff_ao.QuantConfig(reconstruction=recon), split=True,
             calib="uniform", recon=True, bias=False),
    ]


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evaluate(name: str, model: Any, unet: Any, scheduler: Any, metric: DigitsFD, args: argparse.Namespace,
             noises: list[torch.Tensor]) -> dict[str, Any]:
    fds, confs = [], []
    for i, noise in enumerate(noises):
        images = ddim_sample(model, scheduler.config, noise, num_inference_steps=args.steps, batch_size=100,
                             progress=False)
        fds.append(metric.fd(images))
        confs.append(metric.mean_confidence(images))
        if i == 0 and args.grids:
            from torchvision.utils import save_image

            safe = name.replace(" ", "_").replace("/", "-").replace("(", "").replace(")", "").replace(",", "")
            save_image(images[:64] * 0.5 + 0.5, Path(args.out) / f"samples_{safe}.png", nrow=8)
    err = noise_prediction_error(unet, model, scheduler, num_samples=64, num_inference_steps=args.steps,
                                 sample_shape=tuple(noises[0].shape[1:]), seed=0)
    return {"fd_mean": statistics.mean(fds), "fd_std": statistics.pstdev(fds), "fds": fds,
            "confidence": statistics.mean(confs), "eps_error": float(err.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--steps", type=int, default=50, help="DDIM sampling steps")
    parser.add_argument("--calib-steps", type=int, default=100)
    parser.add_argument("--calib-timesteps", type=int, default=20)
    parser.add_argument("--samples-per-timestep", type=int, default=32)
    parser.add_argument("--recon-iters", type=int, default=None, help="AdaRound iterations per block")
    parser.add_argument("--only", nargs="*", default=None, help="row labels to run (substring match)")
    parser.add_argument("--out", default="docs/quality")
    parser.add_argument("--grids", action="store_true", help="write a sample grid per row")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    unet, scheduler, model_name = load_model_folder(None)
    metric = DigitsFD.from_bundled()
    recon = qdiff_ao.ReconstructionConfig() if args.recon_iters is None else qdiff_ao.ReconstructionConfig(
        weight_iters=args.recon_iters, act_iters=args.recon_iters // 2)
    noises = [initial_noise(unet, args.num_samples, seed=1000 + s) for s in range(args.seeds)]
    calibs: dict[str, qdiff_ao.CalibrationSet] = {}

    def calib_for(kind: str) -> qdiff_ao.CalibrationSet:
        if kind not in calibs:
            strategy, n = ("first", 1) if kind == "single" else (kind, args.calib_timesteps)
            calibs[kind] = qdiff_ao.collect_calibration_data(
                unet, scheduler, num_inference_steps=args.calib_steps, num_timesteps=n,
                samples_per_timestep=args.samples_per_timestep * (args.calib_timesteps if n == 1 else 1),
                strategy=strategy, seed=0, progress=False)
        return calibs[kind]

    results = [{"label": "FP32", **evaluate("FP32", unet, unet, scheduler, metric, args, noises),
                "size_bytes": None, "latency_ratio": 1.0, "seconds": 0.0}]
    with tempfile.TemporaryDirectory() as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        fp_bytes = _dir_bytes(Path(tmp))
    results[0]["size_bytes"] = fp_bytes
    print(f"FP32: FD {results[0]['fd_mean']:.3f} ± {results[0]['fd_std']:.3f}", flush=True)
    x8 = torch.randn(8, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    for row in rows(recon):
        if args.only and not any(s in row["label"] for s in args.only):
            continue
        t0 = time.perf_counter()
        qunet = qdiff_ao.quantize(unet, scheduler, row["cfg"], calib=calib_for(row["calib"]), split=row["split"],
                                  reconstruct=row["recon"], bias_correction=row["bias"], progress=False)
        qunet.optimize_for_inference()  # bit-identical, several times faster to sample with
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            qunet.save_pretrained(Path(tmp) / "ckpt")
            size = _dir_bytes(Path(tmp) / "ckpt")
        res = {"label": row["label"], **evaluate(row["label"], qunet, unet, scheduler, metric, args, noises),
               "size_bytes": size, "latency_ratio": speed_ratio(unet, qunet, x8), "seconds": seconds}
        results.append(res)
        print(f"{row['label']}: FD {res['fd_mean']:.3f} ± {res['fd_std']:.3f} ({seconds:.0f} s)", flush=True)
    fd_head = f"digits FD ↓ (mean ± std, {args.seeds} seeds × {args.num_samples} samples)"
    table = [f"| model | {fd_head} | confidence | noise-pred. error | size (KiB) | latency vs FP32 (batch 8) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        table.append(f"| {r['label']} | {r['fd_mean']:.3f} ± {r['fd_std']:.3f} | {r['confidence']:.3f} | "
                     f"{r['eps_error']:.4f} | {r['size_bytes'] / 1024:.0f} | {r['latency_ratio']:.2f}x |")
    text = "\n".join(table)
    print("\n" + text)
    meta = {"model": model_name, "sampler": f"DDIM {args.steps} steps, eta 0", "args": vars(args),
            "reconstruction": recon.__dict__, "torch": torch.__version__}
    (Path(args.out) / "quality.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=2, default=str))
    (Path(args.out) / "quality.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
