"""What each round of the measured precision fallback keeps in float, and the eps error after it (no reconstruction).

    python benchmarks/fallback_rounds.py --models shapes16-cond shapes32 digits [--rounds 3] [--min-error 0.01]

For every model and for W8A8 and W4A8: calibrate (100-step DDIM trajectory, 20 timesteps x 16 samples, the
class-conditional model with its guidance batch), then repeat: measure the fully quantized model's relative error
of the UNet output as the sampler uses it (guided with classifier-free guidance) per calibration timestep (4 rows or
guidance pairs each; printed as t = 0 and the mean over the other
steps), run ``qdiff_ao.passes.choose_float_layers`` with what is left of the 5% MAC budget, keep its new layers in
float, prepare and calibrate again; stop when a round adds nothing. This is the measurement behind the default
``quantize(fallback_rounds=3)`` and the floor ``min_error=0.01``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.quality import MODELS, load_subject  # noqa: E402
from qdiff_ao.calibration.sampler_view import ErrorProbe  # noqa: E402
from qdiff_ao.calibration.sensitivity import _output_tensor  # noqa: E402
from qdiff_ao.passes.fallback_rounds import round_budget, spent_after_round  # noqa: E402
from qdiff_ao.quantizers.simulation import build_simulation  # noqa: E402


def output_errors(prepared: torch.fx.GraphModule, calib: qdiff_ao.CalibrationSet) -> tuple[float, float]:
    """(relative output error at the lowest timestep, mean over the others), 4 rows (or guidance pairs, measured on
    the guided output) per timestep."""
    sim = build_simulation(prepared)
    sim.gm.eval()
    probe = ErrorProbe(calib, 4)
    with torch.no_grad():
        with sim.full_precision():
            ref = probe.outputs(lambda batch: _output_tensor(sim.gm(**batch)))
        errors = probe.errors(probe.outputs(lambda batch: _output_tensor(sim.gm(**batch))), ref)
    return errors[0], sum(errors[1:]) / max(len(errors) - 1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-error", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        subject = load_subject(name)
        calib = qdiff_ao.collect_calibration_data(subject.unet, subject.scheduler, num_inference_steps=100,
                                                  num_timesteps=20, samples_per_timestep=16, seed=0, progress=False,
                                                  **subject.calib_kwargs)
        for wb in (8, 4):
            keep: tuple[str, ...] = ()
            used = 0.0
            for rnd in range(args.rounds + 1):
                cfg = qdiff_ao.QuantConfig(weight_bits=wb, act_bits=8, keep_float=keep)
                prepared = qdiff_ao.prepare(subject.unet, cfg, calib.example_inputs(2))
                qdiff_ao.calibrate(prepared, calib, progress=False)
                at0, mean = output_errors(prepared, calib)
                print(f"{name} W{wb}A8 after round {rnd}: float {list(keep)} ({100 * used:.2f}% MACs); output error "
                      f"t=0 {at0:.4f}, mean over t>0 {mean:.4f}", flush=True)
                if rnd == args.rounds:
                    break
                decision = qdiff_ao.passes.choose_float_layers(prepared, calib, min_error=args.min_error,
                                                               max_macs_fraction=round_budget(0.05, used))
                new = tuple(layer for layer in decision.layers if layer not in keep)
                if not new:
                    break
                keep += new
                used = spent_after_round(used, decision.macs_fraction)


if __name__ == "__main__":
    main()
