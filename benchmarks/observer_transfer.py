"""What one precision-fallback round that keeps layers costs: calibrating the re-prepared graph, or copying the
observer statistics over (``qdiff_ao.calibration.observer_transfer``), timed in one process.

    python benchmarks/observer_transfer.py [--model digits] [--threads 2] [--timesteps 20] [--samples 16]

A trained model (the bundled digits model or a zoo model, ``benchmarks.quality.load_subject``: on the CIFAR-size
UNet with random weights the fallback keeps nothing, so no round prepares again) with its scheduler; calibration
data from the float sampler (100 steps, ``--timesteps`` x ``--samples`` rows; the recipe's default set is 20 x 64,
so its calibration pass is ~4x this one's). W4A8 defaults are prepared and calibrated, the fallback's first round
chooses its layers (``choose_float_layers``, 5% budget), and the graph with those layers in ``keep_float`` is then
built ``--repeats`` times each way, alternating: prepare + calibrate (before 2026-12-07) and prepare + copy. The two
graphs' state dicts must be equal (the script fails otherwise); the table gives the median seconds of each and their
ratio.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import pass_benchmark_parser, use_threads  # noqa: E402
from benchmarks.quality import MODELS, load_subject  # noqa: E402
from qdiff_ao.calibration.observer_transfer import transfer_observer_statistics  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = pass_benchmark_parser(__doc__)
    ap.add_argument("--model", choices=MODELS, default="digits")
    args = ap.parse_args(argv)
    use_threads(args.threads)
    subject = load_subject(args.model)
    unet = subject.unet
    calib = qdiff_ao.collect_calibration_data(unet, subject.scheduler, num_inference_steps=100,
                                              num_timesteps=args.timesteps, samples_per_timestep=args.samples, seed=0,
                                              progress=False, **subject.calib_kwargs)
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)
    prepared = qdiff_ao.prepare(unet, cfg, calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    decision = qdiff_ao.passes.choose_float_layers(prepared, calib)
    keep = dataclasses.replace(cfg, keep_float=decision.layers)
    print(f"{args.model}: {len(calib)} calibration rows; round 1 keeps {list(decision.layers)} in float "
          f"({100 * decision.macs_fraction:.2f}% of MACs)", flush=True)
    seconds: dict[str, list[float]] = {"prepare + calibrate": [], "prepare + copy statistics": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        calibrated = qdiff_ao.prepare(unet, keep, calib.example_inputs(2))
        qdiff_ao.calibrate(calibrated, calib, progress=False)
        seconds["prepare + calibrate"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        copied = qdiff_ao.prepare(unet, keep, calib.example_inputs(2))
        unmatched = transfer_observer_statistics(prepared, copied)
        seconds["prepare + copy statistics"].append(time.perf_counter() - t0)
        if unmatched:
            raise SystemExit(f"observers without a match: {unmatched[:5]}")
        a, b = calibrated.state_dict(), copied.state_dict()
        if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
            raise SystemExit("the copied statistics differ from a calibration pass")
    print("\n| way | median s |\n|---|---:|")
    for way, values in seconds.items():
        print(f"| {way} | {statistics.median(values):.2f} |")
    ratio = statistics.median(seconds["prepare + calibrate"]) / statistics.median(seconds["prepare + copy statistics"])
    print(f"\ncopying is {ratio:.1f}x faster than calibrating again on {len(calib)} rows; state dicts identical")


if __name__ == "__main__":
    main()
