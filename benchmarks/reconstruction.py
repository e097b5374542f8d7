"""Block reconstruction (AdaRound + activation step sizes) vs round-to-nearest: quality and wall time.

    python benchmarks/reconstruction.py [--weight-iters N] [--act-iters N] [--sweep 100,300]
                                        [--cifar extrapolate|full|skip]

1. Per-block output MSE at W4 (weights only) on a small UNet: round-to-nearest vs reconstructed, on the
   blocks' cached calibration rows. The UNet is the bundled digits DDPM when its weights are in the package
   (``qdiff_ao/app/bundled/digits-ddpm/unet``), else a random UNet of the same shape (the table says which).
2. Noise-prediction relative error ||eps_q - eps_fp|| / ||eps_fp|| along a DDIM trajectory of the FP model
   (held-out noise seed), W4A8 converted models (integer kernels): nearest vs reconstructed; plus the
   relative error of the final samples when each model runs its own trajectory. ``--sweep`` repeats the
   W4A8 reconstruction at other iteration counts (quality/time trade-off).
3. Wall time on the google/ddpm-cifar10-32-sized UNet (random weights): calibration data, calibration and
   reconstruction with the given iteration counts. "extrapolate" runs every block with ``--probe-iters``
   iterations and scales each block's optimisation time to the requested counts; "full" runs them. Plus what
   ``quantize``'s reconstruction choice adds: the final decoder stage once more and three sampler runs.

Timings are wall-clock seconds on this machine (shared: other jobs change them).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import bundled_unet, cifar10_ddpm_unet  # noqa: E402
from qdiff_ao import graph_info  # noqa: E402
from qdiff_ao.calibration._plan import plan_sampler  # noqa: E402
from qdiff_ao.passes import reconstruct  # noqa: E402
from qdiff_ao.passes.prediction_spread import SAMPLER_ARGUMENTS  # noqa: E402
from qdiff_ao.passes.reconstruction_choice import final_stage  # noqa: E402
from qdiff_ao.passes.sampler_runs import quantized_denoiser  # noqa: E402

DIGITS_SHAPE: dict[str, Any] = dict(
    sample_size=16, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64, 64),
    norm_num_groups=8, attention_head_dim=8, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)


def small_unet() -> tuple[UNet2DModel, DDIMScheduler, str]:
    unet = bundled_unet()
    if unet is not None:
        from qdiff_ao.app.bundled import DIGITS_DDPM_DIR

        sched_dir = Path(DIGITS_DDPM_DIR) / "scheduler"
        scheduler = DDIMScheduler.from_pretrained(str(sched_dir)) if sched_dir.is_dir() else DDIMScheduler(**SCHEDULER)
        return unet, scheduler, "bundled digits DDPM (trained)"
    torch.manual_seed(0)
    return UNet2DModel(**DIGITS_SHAPE).eval(), DDIMScheduler(**SCHEDULER), "RANDOM UNet of the digits DDPM's shape"


def rcfg_from(args: argparse.Namespace, **over: Any) -> qdiff_ao.ReconstructionConfig:
    base = dict(weight_iters=args.weight_iters, act_iters=args.act_iters, batch_size=args.batch_size, seed=args.seed)
    return qdiff_ao.ReconstructionConfig(**{**base, **over})


def prepared_for(unet: torch.nn.Module, calib: qdiff_ao.CalibrationSet, **cfg: Any) -> torch.fx.GraphModule:
    prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(**cfg), calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    return prepared


def table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for k, r in enumerate(cells):
        print("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if k == 0:
            print("  ".join("-" * w for w in widths))


def part_blocks(unet: UNet2DModel, calib: qdiff_ao.CalibrationSet, args: argparse.Namespace) -> None:
    prepared = prepared_for(unet, calib, weight_bits=4, act_bits=None)
    report = graph_info(reconstruct(prepared, calib, rcfg_from(args, act_iters=0), model=unet,
                                    progress=args.progress)).reconstruction
    rows = [[name, b["kind"], b["num_layers"], b["mse_before"], b["mse_after"], b["mse_after"] / b["mse_before"],
             b["rounding"], b["seconds"]] for name, b in report["blocks"].items()]
    print(f"\n[1] per-block output MSE, W4 weights only ({report['num_samples']} cached rows, "
          f"{args.weight_iters} AdaRound iterations per block, {report['seconds']:.0f} s)")
    table(rows, ["block", "kind", "layers", "mse nearest", "mse recon", "ratio", "rounding", "s"])
    before = sum(b["mse_before"] for b in report["blocks"].values())
    after = sum(b["mse_after"] for b in report["blocks"].values())
    print(f"sum over blocks: nearest {before:.4g}, reconstructed {after:.4g} (ratio {after / before:.3f})")


@torch.no_grad()
def trajectory_errors(models: dict[str, torch.nn.Module], unet: UNet2DModel, scheduler: DDIMScheduler,
                      steps: int, n: int, seed: int) -> tuple[list[int], dict[str, list[float]], dict[str, float]]:
    """Per-step eps relative error on the FP trajectory, and final-sample relative error of own trajectories."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    noise = torch.randn(n, c, s, s, generator=g)
    errs: dict[str, list[float]] = {k: [] for k in models}
    x = noise.clone()
    for t in ddim.timesteps:
        tt = t.reshape(1).repeat(n)
        eps = unet(x, tt).sample
        for k, m in models.items():
            errs[k].append(float((m(sample=x, timestep=tt) - eps).norm() / eps.norm()))
        x = ddim.step(eps, t, x).prev_sample
    x_fp = x
    final: dict[str, float] = {}
    for k, m in models.items():
        x = noise.clone()
        for t in ddim.timesteps:
            x = ddim.step(m(sample=x, timestep=t.reshape(1).repeat(n)), t, x).prev_sample
        final[k] = float((x - x_fp).norm() / x_fp.norm())
    return [int(t) for t in ddim.timesteps], errs, final


def part_trajectory(unet: UNet2DModel, scheduler: DDIMScheduler, calib: qdiff_ao.CalibrationSet,
                    args: argparse.Namespace) -> None:
    prepared = prepared_for(unet, calib, weight_bits=4, act_bits=8)
    models = {"W4A8 nearest": qdiff_ao.convert(prepared)}
    times = {"W4A8 nearest": 0.0}
    runs = [(args.weight_iters, args.act_iters), *[(iters, iters // 2) for iters in args.sweep]]
    for iters, act in runs:
        label = f"W4A8 recon w{iters}/a{act}"
        p = copy.deepcopy(prepared)
        report = graph_info(reconstruct(p, calib, rcfg_from(args, weight_iters=iters, act_iters=act), model=unet,
                                        progress=args.progress)).reconstruction
        models[label] = qdiff_ao.convert(p)
        times[label] = report["seconds"]
    ts, errs, final = trajectory_errors(models, unet, scheduler, args.steps, args.eval_samples, args.seed + 1000)
    print(f"\n[2] noise-prediction relative error along the FP DDIM trajectory ({args.steps} steps, "
          f"{args.eval_samples} held-out samples)")
    pick = sorted(set(range(0, len(ts), max(1, len(ts) // 8))) | {len(ts) - 1})
    table([[ts[i], *[errs[k][i] for k in models]] for i in pick], ["t", *models])
    rows = [[k, sum(v) / len(v), statistics.median(v), final[k], times[k]] for k, v in errs.items()]
    table(rows, ["model", "mean eps rel err", "median", "final x0 rel err", "reconstruction s"])
    print("(the last step's eps is tiny, so its relative error is large for every model)")


def part_cifar(args: argparse.Namespace) -> None:
    unet = cifar10_ddpm_unet()
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    t0 = time.perf_counter()
    calib = qdiff_ao.collect_calibration_data(
        unet, scheduler, num_inference_steps=args.cifar_steps, num_timesteps=args.cifar_timesteps,
        samples_per_timestep=args.cifar_samples, batch_size=args.cifar_samples, seed=args.seed, progress=False)
    t1 = time.perf_counter()
    prepared = prepared_for(unet, calib, weight_bits=4, act_bits=8)
    t2 = time.perf_counter()
    full = args.cifar == "full"
    probe = args.probe_iters
    rcfg = rcfg_from(args) if full else rcfg_from(args, weight_iters=probe, act_iters=probe)
    report = graph_info(reconstruct(prepared, calib, rcfg, model=unet, progress=args.progress)).reconstruction
    t3 = time.perf_counter()
    blocks = report["blocks"].values()
    opt_w = sum(b["weight_seconds"] for b in blocks)
    opt_a = sum(b.get("act_seconds", 0.0) for b in blocks)
    fixed = (t3 - t2) - opt_w - opt_a
    if not full:
        opt_w *= args.weight_iters / probe
        opt_a *= args.act_iters / probe
    total = (t1 - t0) + (t2 - t1) + fixed + opt_w + opt_a
    how = "measured" if full else f"extrapolated from {probe} iterations per block"
    redo, sampling = _choice_cost(unet, prepared, report, 1.0 if full else args.weight_iters / probe,
                                  1.0 if full else args.act_iters / probe)
    print(f"\n[3] wall time, W4A8, google/ddpm-cifar10-32-sized UNet (random weights), {len(report['blocks'])} blocks, "
          f"{report['num_samples']} cached rows, weight_iters={args.weight_iters}, act_iters={args.act_iters}, "
          f"batch_size={args.batch_size} ({how})")
    table([
        ["calibration data (FP sampler)", t1 - t0, f"{args.cifar_timesteps} steps x {args.cifar_samples} samples "
         f"of a {args.cifar_steps}-step DDIM run"],
        ["prepare + calibrate", t2 - t1, f"{len(calib)} rows"],
        ["reconstruction: caching, evaluation, bake", fixed, "measured"],
        ["reconstruction: AdaRound iterations", opt_w, how],
        ["reconstruction: step-size iterations", opt_a, how],
        ["total", total, f"{total / 60:.1f} min"],
        ["reconstruction choice: final stage learned again", redo, f"{how}, from its blocks' times"],
        ["reconstruction choice: 3 sampler runs of 64 x 25 steps", sampling, "25 x (float + 2 quantized steps at "
         "batch 64), each timed, + 2 lowerings"],
        ["total with the choice", total + redo + sampling, f"{(total + redo + sampling) / 60:.1f} min"],
    ], ["stage", "seconds", "note"])
    slow = sorted(report["blocks"].items(), key=lambda kv: -kv[1]["weight_seconds"])[:5]
    per_it = [[n, b["kind"], b["weight_seconds"] / max(b["weight_iters"], 1) * 1e3] for n, b in slow]  # ms
    table(per_it, ["slowest blocks", "kind", "ms / AdaRound iteration"])


def _choice_cost(unet: UNet2DModel, prepared: torch.fx.GraphModule, report: dict[str, Any], scale_w: float,
                 scale_a: float) -> tuple[float, float]:
    """What ``quantize``'s reconstruction choice adds (``passes.reconstruct_and_choose``): the final stage's
    blocks once more (their caching/evaluation time plus scaled optimisation time) and its three sampler runs
    (64 trajectories x 25 DDIM steps: float, run A, run B; the candidates run as ``quantized_denoiser`` gives them,
    on the CPU the lowered INT8 model), from one timed step of each model at batch 64 plus two lowerings."""
    blocks = [report["blocks"][name] for name in final_stage(list(report["blocks"]))]
    redo = sum(b["seconds"] + b["weight_seconds"] * (scale_w - 1) + b.get("act_seconds", 0.0) * (scale_a - 1)
               for b in blocks)
    x = {"sample": torch.randn(64, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size),
         "timestep": torch.full((64,), 500)}
    plan = plan_sampler(unet, DDIMScheduler(num_train_timesteps=1000), num_inference_steps=25, **SAMPLER_ARGUMENTS)
    t0 = time.perf_counter()
    quantized = quantized_denoiser(prepared, plan)
    lowering = time.perf_counter() - t0
    with torch.no_grad():
        step = {}
        for name, run in (("float", lambda: unet(**x)), ("quantized", lambda: quantized(x))):
            run()
            t0 = time.perf_counter()
            run()
            step[name] = time.perf_counter() - t0
    return redo, 25 * (step["float"] + 2 * step["quantized"]) + 2 * lowering


def main(argv: list[str] | None = None) -> None:
    defaults = qdiff_ao.ReconstructionConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weight-iters", type=int, default=defaults.weight_iters)
    ap.add_argument("--act-iters", type=int, default=defaults.act_iters)
    ap.add_argument("--batch-size", type=int, default=defaults.batch_size)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps of calibration and evaluation runs")
    ap.add_argument("--calib-timesteps", type=int, default=10)
    ap.add_argument("--calib-samples", type=int, default=32, help="calibration samples per timestep")
    ap.add_argument("--eval-samples", type=int, default=16)
    ap.add_argument("--sweep", type=lambda s: [int(v) for v in s.split(",") if v], default=[],
                    help="extra W4A8 AdaRound iteration counts (act iterations: half), e.g. 100,300")
    ap.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1,2")
    ap.add_argument("--cifar", choices=("extrapolate", "full", "skip"), default="extrapolate")
    ap.add_argument("--probe-iters", type=int, default=10, help="iterations per block when extrapolating")
    ap.add_argument("--cifar-steps", type=int, default=20)
    ap.add_argument("--cifar-timesteps", type=int, default=10)
    ap.add_argument("--cifar-samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--progress", action="store_true", help="tqdm bars per block")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {p.strip() for p in args.parts.split(",")}
    print(f"torch threads: {torch.get_num_threads()}")
    if parts & {"1", "2"}:
        unet, scheduler, label = small_unet()
        print(f"small UNet: {label}, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters")
        t0 = time.perf_counter()
        calib = qdiff_ao.collect_calibration_data(
            unet, scheduler, num_inference_steps=args.steps, num_timesteps=args.calib_timesteps,
            samples_per_timestep=args.calib_samples, batch_size=args.calib_samples, seed=args.seed, progress=False)
        print(f"calibration set: {len(calib)} rows over {len(calib.timesteps())} timesteps "
              f"({time.perf_counter() - t0:.1f} s)")
        if "1" in parts:
            part_blocks(unet, calib, args)
        if "2" in parts:
            part_trajectory(unet, scheduler, calib, args)
    if "3" in parts and args.cifar != "skip":
        part_cifar(args)


if __name__ == "__main__":
    main()
