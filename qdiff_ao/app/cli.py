"""``qdiff-ao``: a thin command-line front end over the public API.

    qdiff-ao quantize                       # the bundled digits DDPM to W4A8 with the full recipe -> ./qdiff-out
    qdiff-ao quantize --model DIR --weight-bits 8 --act-bits 8 --out out/w8a8
    qdiff-ao quantize --model SD_PIPELINE_DIR --prompts prompts.txt --guidance-scale 7.5 --out out/sd
    qdiff-ao info                           # versions, kernels, bundled artifacts
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import diffusers
import torch

import qdiff_ao
from qdiff_ao.app.bundled import DIGITS_DDPM_DIR
from qdiff_ao.app.main_job import MainJobError, run_main_job

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qdiff-ao", description="Q-Diffusion post-training quantization of "
                                     "diffusers UNets, lowered to real INT8 kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a diffusers pipeline's UNet and write a quantized pipeline + report",
                       description="Quantize the UNet of a diffusers pipeline folder (DDPM/DDIM, or a "
                       "StableDiffusionPipeline-shaped text-to-image folder; or a unet/ + scheduler/ folder; default: "
                       "the bundled digits DDPM) with timestep-uniform calibration, split shortcuts, a measured float "
                       "fallback for harmful quantizers, reconstruction and a per-timestep-group output correction, "
                       "then write OUT/pipeline (loads with DiffusionPipeline.from_pretrained; model card inside), "
                       "report.md/json, sample grids and activation plots.")
    q.add_argument("--model", type=Path, default=None, help="diffusers pipeline folder (model_index.json) or a "
                   "folder with unet/ and scheduler/ (default: the bundled digits DDPM)")
    q.add_argument("--prompts", type=Path, default=None, help="text-to-image: calibration prompts, one per line "
                   "(default: 16 varied prompts shipped with qdiff_ao)")
    q.add_argument("--guidance-scale", type=float, default=7.5, help="text-to-image: classifier-free guidance of "
                   "the calibration sampler and the report samples (<= 1: no guidance)")
    q.add_argument("--negative-prompt", default=None, help="text-to-image: the prompt of the unconditional half "
                   "(default: the empty prompt)")
    q.add_argument("--weight-bits", type=int, default=4)
    q.add_argument("--act-bits", type=int, default=8, help="activation bits; 0 = weights only")
    q.add_argument("--no-split", action="store_true", help="disable split shortcut quantization")
    q.add_argument("--no-bias-correction", action="store_true",
                   help="keep the mean quantization error of the noise prediction (see passes.correct_output)")
    q.add_argument("--correction-gain", action="store_true",
                   help="let the output correction take PTQD gains as well as offsets (see passes.correct_output)")
    q.add_argument("--correction-input", action="store_true",
                   help="let the output correction take the linear estimate from the quantized output and the "
                   "UNet's input (a y + c x - b) where held-back rows prefer it (see passes.correct_output)")
    q.add_argument("--attention-grids", choices=["affine", "measured", "symmetric"], default="affine",
                   help="grids of attention's Q, K, V: affine (the default), symmetric where that costs at most half "
                   "a bit (measured), or always symmetric; OpenVINO runs attention in INT8 on symmetric ones (see "
                   "passes.choose_attention_grids)")
    q.add_argument("--timestep-groups", type=int, default=4, metavar="G",
                   help="offer G groups of calibration timesteps their own activation grids, kept where held-back "
                   "rows say they help (see passes.choose_timestep_groups; default 4); 1 = one grid")
    q.add_argument("--float-tail", action="store_true",
                   help="opt-in: run the last timesteps (<= 5%% of T) with float activations on the same integer "
                   "weights where the activation quantizers hold most of the measured error (see "
                   "passes.choose_float_tail); those steps run at float speed")
    q.add_argument("--no-prediction-spread", action="store_true",
                   help="skip the denoised-spread correction fitted on sampler runs (see "
                   "passes.match_prediction_spread)")
    q.add_argument("--no-reconstruction-choice", action="store_true",
                   help="one reconstruction run: skip learning the final decoder stage a second time and keeping the "
                   "run whose samples end nearer the float model's (see passes.reconstruct_and_choose)")
    q.add_argument("--reconstruction-candidates", type=int, default=2, metavar="K",
                   help="runs the reconstruction choice judges, the first included (>= 2; each more relearns the "
                   "final decoder stage and samples once more)")
    q.add_argument("--no-precision-fallback", action="store_true",
                   help="quantize every layer, even those whose quantizers the sensitivity measurement finds "
                   "harmful (see passes.choose_float_layers)")
    q.add_argument("--no-sensitivity", action="store_true",
                   help="skip the per-quantizer sensitivity report and heat map (one forward per quantizer)")
    q.add_argument("--calibration-strategy", choices=["uniform", "q_diffusion", "first", "last"], default="uniform")
    q.add_argument("--calibration-steps", type=int, default=100, help="sampler steps of the calibration run")
    q.add_argument("--calibration-timesteps", type=int, default=20, help="timesteps kept for calibration")
    q.add_argument("--samples-per-timestep", type=int, default=32)
    q.add_argument("--recon-iters", type=int, default=None,
                   help="AdaRound iterations per block (0 = no reconstruction; default: the config's)")
    q.add_argument("--num-samples", type=int, default=None, help="images sampled for the report (default: 300 "
                   "for the digits FD, the size of its held-out reference set; 16 for text-to-image; 64 otherwise)")
    q.add_argument("--sampling-steps", type=int, default=50, help="DDIM steps for the report samples")
    q.add_argument("--out", type=Path, default=Path("qdiff-out"))
    q.add_argument("--overwrite", action="store_true", help="replace the output of an earlier run in --out")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    q.add_argument("--device", default="cpu",
                   help="where the float model is calibrated and reconstructed: cpu (default) or cuda[:N] (under "
                        "torchrun, cuda = each rank's own GPU); the quantized model is the CPU INT8 model either way")
    q.add_argument("--backend", choices=["torch", "openvino"], default="torch",
                   help="what runs the quantized UNet for the report's samples and speed: frozen TorchScript on "
                        "fbgemm (torch) or OpenVINO's INT8 runtime on our Q/DQ export (pip install "
                        "'qdiff_ao[openvino]'); the checkpoint is the same either way")
    q.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("info", help="print versions, the quantized kernel engine and bundled artifacts")
    return parser


def _info() -> int:
    print(f"qdiff_ao {qdiff_ao.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(f"quantized engines: {torch.backends.quantized.supported_engines} (active: "
          f"{torch.backends.quantized.engine})")
    print(f"bundled digits DDPM: {DIGITS_DDPM_DIR} ({'present' if (DIGITS_DDPM_DIR / 'unet').is_dir() else 'missing'})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qdiff-ao`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "info":
        return _info()
    try:
        run_main_job(args)
    except MainJobError as err:
        print(f"qdiff-ao quantize: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
