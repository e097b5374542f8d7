"""What the recorded float outputs save: the output correction with and without ``CalibrationSet.float_output``,
timed in one process.

    python benchmarks/float_reference.py [--threads 2] [--timesteps 20] [--samples 16] [--repeats 2]

The CIFAR-10-size UNet (google/ddpm-cifar10-32's configuration, random weights, DDPM with 1,000 linear betas, as
``benchmarks/recipe_time.py``). Calibration data come from the float sampler (100 steps, ``--timesteps`` x
``--samples`` rows; the recipe's default set is 20 x 64, so its passes handle 4x these rows); W4A8 defaults are
prepared and calibrated once. Then, alternating ``--repeats`` times, a copy of the calibrated graph goes through
``correct_output`` (the recipe's pass that reads the recorded outputs) with the collected set, and with the same set
without its ``float_output`` (the float model runs on every row, as before 2026-12-07). Printed: median seconds
both ways and the ratio, and the largest difference between the two runs' reports (the same decisions; the
numbers differ by float rounding only). (The first version of this script also timed ``choose_timestep_groups``;
that pass keeps its own reference, see ``passes/timestep_groups.py``.)
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import cifar10_ddpm_unet, pass_benchmark_parser, use_threads  # noqa: E402
from qdiff_ao.calibration.calibration_set import CalibrationSet  # noqa: E402
from qdiff_ao.passes.output_correction import correct_output  # noqa: E402


def _without_outputs(calib: CalibrationSet) -> CalibrationSet:
    tensors = {k: v for k, v in calib._tensors().items() if k != "float_output"}
    return CalibrationSet(metadata=calib.metadata, **tensors)


def main(argv: list[str] | None = None) -> None:
    ap = pass_benchmark_parser(__doc__)
    args = ap.parse_args(argv)
    use_threads(args.threads)
    unet = cifar10_ddpm_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    t0 = time.perf_counter()
    calib = qdiff_ao.collect_calibration_data(unet, scheduler, num_inference_steps=100, num_timesteps=args.timesteps,
                                              samples_per_timestep=args.samples, batch_size=32, progress=False)
    print(f"collected {len(calib)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(), calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    sets = {"recorded float outputs": calib, "float model run (before)": _without_outputs(calib)}
    seconds: dict[str, list[float]] = {}
    reports: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for name, c in sets.items():
            graph = copy.deepcopy(prepared)
            t0 = time.perf_counter()
            correct_output(graph, c, unet, num_groups=8, batch_size=32)
            seconds.setdefault(name, []).append(time.perf_counter() - t0)
            reports[name] = qdiff_ao.graph_info(graph).bias_correction["groups"]
    a, b = (statistics.median(seconds[name]) for name in sets)
    print(f"\n| pass ({len(calib)} rows, {torch.get_num_threads()} threads) | recorded (s) | run (s) | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| output correction | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    first, second = reports.values()
    decisions = [g["kind"] for g in first] == [g["kind"] for g in second]
    worst = max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-12) for x, y in zip(first, second, strict=True)
                for k in ("mse_before", "mse_after"))
    print(f"\nsame decisions: {decisions}; largest relative difference of a reported error: {worst:.2e}")


if __name__ == "__main__":
    main()
