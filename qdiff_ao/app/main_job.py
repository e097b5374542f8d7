"""The main job behind ``qdiff-ao quantize``: quantize a model folder and write checkpoint, report and figures.

Output folder layout::

    OUT/checkpoint/            the compressed quantized UNet (qdiff_ao.load / QuantizedUNet.from_pretrained)
    OUT/report.md, report.json size, speed, FD, confidence, noise-prediction error, timings, settings
    OUT/samples_fp.png         FP32 samples (DDIM, fixed noise)
    OUT/samples_quantized.png  quantized samples from the same noise
    OUT/activation_ranges.png  per-timestep activation ranges of the most drifting layers
    OUT/split_histograms.png   the two halves of skip concats (when split shortcuts are on)
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import diffusers
import torch

from qdiff_ao import workflow
from qdiff_ao.app import bundled, metrics
from qdiff_ao.app.bundled import DIGITS_DDPM_DIR
from qdiff_ao.app.output_folder import StagedOutput, check_output_target
from qdiff_ao.app.sampling import ddim_sample, initial_noise
from qdiff_ao.calibration.range_report import plot_activation_ranges, plot_split_histograms
from qdiff_ao.calibration.sensitivity import sensitivity
from qdiff_ao.config import QuantConfig, ReconstructionConfig

__all__ = ["MainJobError", "run_main_job", "load_model_folder", "speed_ratio"]

logger = logging.getLogger(__name__)


class MainJobError(ValueError):
    """A problem with the command's input (paths, model kind), reported without a traceback."""


def load_model_folder(path: Path | None) -> tuple[Any, Any, str]:
    """(unet, scheduler, name) from a diffusers folder with unet/ and scheduler/, or the bundled DDPM.

    Raises:
        MainJobError: the folder is missing, incomplete, unreadable or not an unconditional UNet2DModel.
    """
    name = "bundled digits DDPM" if path is None else str(path)
    root = Path(DIGITS_DDPM_DIR if path is None else path)
    if not root.is_dir():
        raise MainJobError(f"model folder {root} does not exist (expected a diffusers folder with unet/ and "
                           "scheduler/, as written by pipeline.save_pretrained)")
    for sub in ("unet", "scheduler"):
        if not (root / sub).is_dir():
            hint = " (train it with examples/train_ddpm.py)" if path is None else ""
            raise MainJobError(f"{root} has no {sub}/ subfolder{hint}; expected a diffusers pipeline folder")
    unet_cfg = _read_json(root / "unet" / "config.json")
    if unet_cfg.get("_class_name") != "UNet2DModel":
        raise MainJobError(
            f"qdiff-ao quantize supports unconditional UNet2DModel folders, got {unet_cfg.get('_class_name')!r}; "
            "quantize conditional UNets from Python (qdiff_ao.quantize with encoder_hidden_states=...)"
        )
    sched_cfg = _read_json(root / "scheduler" / "scheduler_config.json")
    sched_cls = getattr(diffusers, str(sched_cfg.get("_class_name")), None)
    if not (isinstance(sched_cls, type) and issubclass(sched_cls, diffusers.SchedulerMixin)):
        raise MainJobError(f"unknown scheduler class {sched_cfg.get('_class_name')!r} in {root / 'scheduler'}")
    try:
        # str paths: diffusers records the load path in the config, which must stay JSON-serialisable.
        unet = diffusers.UNet2DModel.from_pretrained(str(root / "unet")).eval()
        scheduler = sched_cls.from_pretrained(str(root / "scheduler"))
    except (OSError, ValueError, TypeError, KeyError) as err:  # missing weights, a config diffusers refuses
        raise MainJobError(f"cannot load the model in {root}: {type(err).__name__}: {err}") from None
    return unet, scheduler, name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MainJobError(f"{path} is missing; expected a diffusers model folder") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise MainJobError(f"{path} is not a readable JSON config ({type(err).__name__}: {err})") from None
    if not isinstance(value, dict):
        raise MainJobError(f"{path} holds a JSON {type(value).__name__}, not a config object")
    return value


def check_args(args: argparse.Namespace) -> None:
    """Validate every option before any work is done (and before anything is written).

    Raises:
        MainJobError: naming the option, what it must be and what it got.
    """
    positive = {"--calibration-steps": args.calibration_steps, "--calibration-timesteps": args.calibration_timesteps,
                "--samples-per-timestep": args.samples_per_timestep, "--num-samples": args.num_samples,
                "--sampling-steps": args.sampling_steps}
    if args.threads is not None:
        positive["--threads"] = args.threads
    for option, value in positive.items():
        if value < 1:
            raise MainJobError(f"{option} must be >= 1, got {value}")
    for option, value in (("--seed", args.seed), ("--recon-iters", args.recon_iters)):
        if value is not None and value < 0:
            raise MainJobError(f"{option} must be >= 0, got {value}")
    if args.calibration_timesteps > args.calibration_steps:
        raise MainJobError(f"--calibration-timesteps ({args.calibration_timesteps}) cannot exceed "
                           f"--calibration-steps ({args.calibration_steps}): timesteps are picked from the steps")
    try:
        check_output_target(args.out, args.overwrite)
    except ValueError as err:
        raise MainJobError(str(err)) from None


def speed_ratio(fp: Any, q: Any, x: torch.Tensor, rounds: int = 5) -> float:
    """Median over interleaved rounds of time(fp) / time(q) for one forward at the batch of ``x``."""
    t = torch.full((x.shape[0],), 500)
    ratios = []
    with torch.no_grad():
        fp(x, t)
        q(x, t)
        for _ in range(rounds):
            t0 = time.perf_counter()
            fp(x, t)
            t1 = time.perf_counter()
            q(x, t)
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_main_job(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize, then write the output folder described in the module docstring; returns the report dict."""
    from torchvision.utils import save_image  # torchvision: an optional extra, needed by the main job only

    check_args(args)
    rcfg = ReconstructionConfig()
    if args.recon_iters:
        rcfg = ReconstructionConfig(weight_iters=args.recon_iters, act_iters=max(1, args.recon_iters // 2))
    try:
        cfg = QuantConfig(weight_bits=args.weight_bits, act_bits=args.act_bits or None, reconstruction=rcfg)
    except ValueError as err:
        raise MainJobError(str(err)) from None
    unet, scheduler, name = load_model_folder(args.model)
    if args.threads:
        torch.set_num_threads(args.threads)
    staged = StagedOutput(args.out)
    try:
        report = _quantize_and_report(args, unet, scheduler, name, cfg, staged.path, save_image)
        staged.publish()
    finally:
        staged.discard()  # a no-op once published
    print(_markdown(report))
    return report


def _quantize_and_report(args: argparse.Namespace, unet: Any, scheduler: Any, name: str, cfg: QuantConfig,
                         out: Path, save_image: Any) -> dict[str, Any]:
    """Quantize and write checkpoint, figures and report into ``out`` (the staging folder)."""
    progress = not args.quiet
    figures: dict[str, str] = {}
    extra: dict[str, Any] = {}

    def on_prepared(prepared: Any, calib: Any) -> None:
        if cfg.act_bits is not None:
            plot_activation_ranges(prepared, out / "activation_ranges.png")
            figures["activation_ranges"] = "activation_ranges.png"
        if not args.no_split:
            rows = min(16, max(calib.timestep_histogram().values()))
            plot_split_histograms(prepared, calib.example_inputs(rows), out / "split_histograms.png")
            figures["split_histograms"] = "split_histograms.png"
        if not getattr(args, "no_sensitivity", False):
            found = sensitivity(prepared, calib, rows_per_timestep=2, progress=progress)
            found.plot(out / "sensitivity.png")
            figures["sensitivity"] = "sensitivity.png"
            extra["sensitivity"] = found.to_dict(top=20)
            extra["sensitivity_table"] = found.format_table(10)

    t_start = time.perf_counter()
    qunet = workflow.quantize(
        unet, scheduler, cfg, num_inference_steps=args.calibration_steps, num_timesteps=args.calibration_timesteps,
        samples_per_timestep=args.samples_per_timestep, calibration_strategy=args.calibration_strategy,
        split=not args.no_split, reconstruct=args.recon_iters != 0,
        bias_correction=not getattr(args, "no_bias_correction", False),
        precision_fallback=not getattr(args, "no_precision_fallback", False), seed=args.seed, progress=progress,
        on_prepared=on_prepared,
    )
    quantize_s = time.perf_counter() - t_start
    qunet.save_pretrained(out / "checkpoint")
    with tempfile.TemporaryDirectory() as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        fp_bytes = _dir_bytes(Path(tmp))
    q_bytes = _dir_bytes(out / "checkpoint")
    qunet.optimize_for_inference()  # bit-identical frozen TorchScript: faster sampling and the speed we report

    noise = initial_noise(unet, args.num_samples, args.seed)
    samples = {
        "fp": ddim_sample(unet, scheduler.config, noise, num_inference_steps=args.sampling_steps, progress=progress,
                          desc="FP32 samples"),
        "quantized": ddim_sample(qunet, scheduler.config, noise, num_inference_steps=args.sampling_steps,
                                 progress=progress, desc="quantized samples"),
    }
    for key, images in samples.items():
        save_image(images[:64] * 0.5 + 0.5, out / f"samples_{key}.png", nrow=8)
    report: dict[str, Any] = {
        "model": name, "scheme": cfg.name, "config": cfg.to_dict(), "quantize_seconds": round(quantize_s, 1),
        "timings": qunet.quantization_info["timings"], "splits": len(qunet.quantization_info["splits"]),
        "checkpoint_bytes": q_bytes, "fp32_safetensors_bytes": fp_bytes, "size_ratio": q_bytes / fp_bytes,
        "speed_ratio_vs_fp32": {}, "num_samples": args.num_samples, "sampling": f"DDIM {args.sampling_steps} steps",
        "figures": figures, "most_drifting": qunet.quantization_info["most_drifting"],
        "precision_fallback": qunet.quantization_info["precision_fallback"],
        "output_correction": qunet.quantization_info["bias_correction"], **extra,
    }
    c, s = unet.config.in_channels, unet.config.sample_size
    for b in (1, 8):
        report["speed_ratio_vs_fp32"][f"batch_{b}"] = round(speed_ratio(unet, qunet, torch.randn(b, c, s, s)), 2)
    noise_err = metrics.noise_prediction_error(
        lambda sample, timestep: unet(sample, timestep), lambda sample, timestep: qunet(sample, timestep),
        scheduler, num_samples=min(64, args.num_samples), num_inference_steps=args.sampling_steps,
        sample_shape=(c, s, s), seed=args.seed,
    )
    report["noise_prediction_error_mean"] = float(noise_err.mean())
    if (c, s) == (1, bundled.IMAGE_SIZE):
        metric = metrics.DigitsFD.from_bundled()
        report["fd"] = {k: metric.fd(v) for k, v in samples.items()}
        report["confidence"] = {k: metric.mean_confidence(v) for k, v in samples.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report))
    return report


def _markdown(r: dict[str, Any]) -> str:
    timings = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
    lines = [f"# qdiff-ao quantize: {r['model']} -> {r['scheme']}", "",
             "| measure | FP32 | quantized |", "|---|---:|---:|"]
    if "fd" in r:
        lines.append(f"| digits FD (classifier features, {r['num_samples']} samples) | {r['fd']['fp']:.3f} | "
                     f"{r['fd']['quantized']:.3f} |")
        conf = r["confidence"]
        lines.append(f"| mean classifier confidence | {conf['fp']:.3f} | {conf['quantized']:.3f} |")
    lines += [
        f"| size (bytes) | {r['fp32_safetensors_bytes']:,} | {r['checkpoint_bytes']:,} ({r['size_ratio']:.3f}x) |",
        "| speed vs FP32 eager, batch 1 / 8 (quantized: frozen TorchScript) | 1.00x | "
        f"{r['speed_ratio_vs_fp32']['batch_1']:.2f}x / "
        f"{r['speed_ratio_vs_fp32']['batch_8']:.2f}x |",
        f"| mean relative noise-prediction error along the FP DDIM trajectory | 0 | "
        f"{r['noise_prediction_error_mean']:.4f} |",
        "", f"Quantization took {r['quantize_seconds']} s ({timings}); "
        f"{r['splits']} skip concats split. Samples: {r['sampling']}, same initial noise for both models.", "",
        "Figures: samples_fp.png, samples_quantized.png, " + ", ".join(r["figures"].values()), "",
    ]
    fallback = r.get("precision_fallback")
    if fallback is not None:
        kept = ", ".join(f"`{name}`" for name in fallback["layers"]) or "none"
        lines += [f"Precision fallback (measured): layers kept in float: {kept} "
                  f"({100 * fallback['macs_fraction']:.2f}% of the quantized multiply-accumulates; "
                  f"{len(fallback['harmful'])} harmful quantizers found in {fallback['forwards']} forwards).", ""]
    correction = r.get("output_correction")
    if correction is not None and correction.get("method") == "timestep_groups":
        lines += [f"Output correction: {correction['num_groups_kept']} of {len(correction['groups'])} timestep "
                  "groups kept (each only where it lowers the error on held-back calibration rows).", ""]
    if "sensitivity_table" in r:
        lines += ["Sensitivity (relative eps error caused by each quantizer alone; heat map: sensitivity.png):", "",
                  "```", r["sensitivity_table"], "```", ""]
    return "\n".join(lines)
