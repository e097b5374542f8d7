"""The sensitivity heat map of a zoo model: the error each quantizer causes alone, per calibration timestep.

    python benchmarks/sensitivity_map.py --model shapes32 [--weight-bits 8] [--out docs/figures]

Calibrates W8A8 (default) with the defaults' calibration (100-step DDIM trajectory, 20 timesteps including the
last step, 8 samples each), measures ``qdiff_ao.report.sensitivity`` (every quantizer alone, 2 rows per
timestep) and the precision fallback's decision, and writes ``sensitivity_<model>.png`` and a ranked table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.quality import MODELS, load_subject  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="shapes32")
    parser.add_argument("--weight-bits", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    subject = load_subject(args.model)
    calib = qdiff_ao.collect_calibration_data(subject.unet, subject.scheduler, num_inference_steps=100,
                                              num_timesteps=20, samples_per_timestep=8, progress=False,
                                              **subject.calib_kwargs)
    cfg = qdiff_ao.QuantConfig(weight_bits=args.weight_bits, act_bits=8)
    prepared = qdiff_ao.prepare(subject.unet, cfg, calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    report = qdiff_ao.report.sensitivity(prepared, calib, rows_per_timestep=2)
    args.out.mkdir(parents=True, exist_ok=True)
    report.plot(args.out / f"sensitivity_{args.model}.png")
    decision = qdiff_ao.passes.choose_float_layers(prepared, calib)
    print(f"{args.model} {cfg.name}, CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(report.format_table(12))
    print(f"precision fallback keeps {list(decision.layers)} in float ({100 * decision.macs_fraction:.2f}% of MACs; "
          f"{decision.forwards} forwards); harmful: "
          f"{[(h['value'], h['kind'], round(h['worst_error'], 4), h['at_timestep']) for h in decision.harmful]}")


if __name__ == "__main__":
    main()
