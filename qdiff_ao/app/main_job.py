"""The main job behind ``qdiff-ao quantize``: quantize a model folder and write pipeline, report and figures.

Output folder layout::

    OUT/pipeline/              the quantized pipeline: DiffusionPipeline.from_pretrained(OUT/pipeline) loads it
    OUT/pipeline/unet/         the compressed quantized UNet (qdiff_ao.load / QuantizedUNet.from_pretrained)
    OUT/pipeline/README.md     its model card, generated from this report
    OUT/report.md, report.json size, speed, quality, noise-prediction error, timings, settings
    OUT/samples_fp.png         FP32 samples (DDIM for unconditional models, the pipeline for text-to-image)
    OUT/samples_quantized.png  quantized samples from the same noise (and prompts)
    OUT/activation_ranges.png  per-timestep activation ranges of the most drifting layers
    OUT/split_histograms.png   the two halves of skip concats (when split shortcuts are on)
    OUT/sensitivity.png        the per-quantizer sensitivity heat map
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from qdiff_ao import workflow
from qdiff_ao.app import bundled, metrics
from qdiff_ao.app.device_option import calibration_device
from qdiff_ao.app.model_card import model_card
from qdiff_ao.app.model_source import MainJobError, ModelSource, load_model_source
from qdiff_ao.app.output_folder import StagedOutput, check_output_target
from qdiff_ao.app.pipeline_output import write_pipeline_folder
from qdiff_ao.app.prompts import DEFAULT_PROMPTS_FILE, read_prompts
from qdiff_ao.app.sampling import ddim_sample, initial_noise, pipeline_sample
from qdiff_ao.calibration.distributed import init_from_environment, is_main_process, rank_and_world
from qdiff_ao.calibration.range_report import plot_activation_ranges, plot_split_histograms
from qdiff_ao.calibration.sensitivity import sensitivity
from qdiff_ao.config import QuantConfig, ReconstructionConfig
from qdiff_ao.deploy.openvino_runtime import openvino_available
from qdiff_ao.passes.reconstruction_choice import SWITCH_CONFIDENCE

__all__ = ["MainJobError", "run_main_job", "speed_ratio"]

logger = logging.getLogger(__name__)

SPEED_BATCH = 8

def check_args(args: argparse.Namespace, check_output: bool = True) -> None:
    """Validate every option before any work is done (and before anything is written).

    ``check_output=False`` skips the ``--out`` checks (ranks other than 0 of a process group write nothing).

    Raises:
        MainJobError: naming the option, what it must be and what it got.
    """
    positive = {"--calibration-steps": args.calibration_steps, "--calibration-timesteps": args.calibration_timesteps,
                "--samples-per-timestep": args.samples_per_timestep, "--sampling-steps": args.sampling_steps}
    for option, value in (("--threads", args.threads), ("--num-samples", args.num_samples)):
        if value is not None:
            positive[option] = value
    for option, value in positive.items():
        if value < 1:
            raise MainJobError(f"{option} must be >= 1, got {value}")
    for option, value in (("--seed", args.seed), ("--recon-iters", args.recon_iters)):
        if value is not None and value < 0:
            raise MainJobError(f"{option} must be >= 0, got {value}")
    if args.calibration_timesteps > args.calibration_steps:
        raise MainJobError(f"--calibration-timesteps ({args.calibration_timesteps}) cannot exceed "
                           f"--calibration-steps ({args.calibration_steps}): timesteps are picked from the steps")
    if not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
        raise MainJobError(f"--guidance-scale must be a finite number >= 0 (<= 1 turns guidance off), got "
                           f"{args.guidance_scale}")
    if getattr(args, "backend", "torch") == "openvino" and not openvino_available():
        raise MainJobError("--backend openvino needs the openvino package: pip install 'qdiff_ao[openvino]' (or drop "
                           "--backend to run the quantized UNet on torch's fbgemm kernels)")
    calibration_device(getattr(args, "device", "cpu"))
    if getattr(args, "reconstruction_candidates", 2) < 2:
        raise MainJobError(f"--reconstruction-candidates must be >= 2 (the first run and at least one rerun), got "
                           f"{args.reconstruction_candidates}; --no-reconstruction-choice makes one run")
    if args.prompts is not None:
        read_prompts(args.prompts)  # an empty or unreadable file fails here, before any model loads
    try:
        if check_output:
            check_output_target(args.out, args.overwrite)
    except ValueError as err:
        raise MainJobError(str(err)) from None


def _check_args_fit_model(args: argparse.Namespace, source: ModelSource) -> None:
    text_options = [o for o, v in (("--prompts", args.prompts), ("--negative-prompt", args.negative_prompt)) if v]
    if source.kind != "text-to-image" and text_options:
        raise MainJobError(f"{' and '.join(text_options)} only apply to text-to-image pipelines; {source.name} "
                           f"holds an {source.kind} model: drop them")


def speed_ratio(fp: Any, q: Any, inputs: dict[str, torch.Tensor], rounds: int = 5) -> float:
    """Median over interleaved rounds of time(fp) / time(q) for one forward on ``inputs`` at timestep 500.

    ``inputs`` holds ``sample`` and any other UNet input (``encoder_hidden_states``) at the batch to time.
    """
    t = torch.full((inputs["sample"].shape[0],), 500)
    ratios = []
    with torch.no_grad():
        fp(timestep=t, **inputs)
        q(timestep=t, **inputs)
        for _ in range(rounds):
            t0 = time.perf_counter()
            fp(timestep=t, **inputs)
            t1 = time.perf_counter()
            q(timestep=t, **inputs)
            t2 = time.perf_counter()
            ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ratios)


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_main_job(args: argparse.Namespace) -> dict[str, Any]:
    """Quantize, then write the output folder described in the module docstring; returns the report dict."""
    from torchvision.utils import save_image  # torchvision: an optional extra, needed by the main job only

    init_from_environment()  # under torchrun: calibration runs data-parallel; rank 0 writes everything
    main = is_main_process()
    check_args(args, check_output=main)
    rcfg = ReconstructionConfig()
    if args.recon_iters:
        rcfg = ReconstructionConfig(weight_iters=args.recon_iters, act_iters=max(1, args.recon_iters // 2))
    try:
        grids_by_flag: dict[str, bool | str] = {"measured": "measured", "symmetric": True, "affine": False}
        grids = grids_by_flag[args.attention_grids]
        cfg = QuantConfig(weight_bits=args.weight_bits, act_bits=args.act_bits or None, reconstruction=rcfg,
                          attention_symmetric=grids)
    except ValueError as err:
        raise MainJobError(str(err)) from None
    source = load_model_source(args.model)
    _check_args_fit_model(args, source)
    if args.threads:
        torch.set_num_threads(args.threads)
    text = _TextConditioning(args, source.pipeline) if source.kind == "text-to-image" else None
    if not main:
        _quantize(args, source, cfg, text, None)
        return {}
    staged = StagedOutput(args.out)
    try:
        report = _quantize_and_report(args, source, cfg, text, staged.path, save_image)
        staged.publish()
    finally:
        staged.discard()  # a no-op once published
    print(_markdown(report))
    return report


class _TextConditioning:
    """Prompts, guidance and their embeddings for a text-to-image run (calibration, samples, error, speed)."""

    def __init__(self, args: argparse.Namespace, pipeline: Any) -> None:
        self.prompts = read_prompts(args.prompts)
        self.source = str(args.prompts) if args.prompts else f"the default set, {DEFAULT_PROMPTS_FILE.name}"
        self.guidance_scale = args.guidance_scale
        self.negative_prompt = args.negative_prompt
        with torch.no_grad():
            self.embeddings = pipeline.encode_prompt(self.prompts, torch.device("cpu"), 1, False)[0]

    def collect_kwargs(self) -> dict[str, Any]:
        return {"prompts": self.prompts, "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt}

    def rows(self, n: int) -> torch.Tensor:
        """Prompt embeddings for ``n`` samples, prompt ``j mod P`` for sample ``j``."""
        return self.embeddings[torch.arange(n) % len(self.prompts)]


def _samples(args: argparse.Namespace, source: ModelSource, qunet: Any, text: _TextConditioning | None,
             num_samples: int, progress: bool) -> dict[str, torch.Tensor]:
    """FP and quantized samples in [0, 1] from the same initial noise (and prompts)."""
    if text is None:
        noise = initial_noise(source.unet, num_samples, args.seed)
        sched = source.scheduler.config
        return {key: ddim_sample(model, sched, noise, num_inference_steps=args.sampling_steps, progress=progress,
                                 desc=f"{key} samples") * 0.5 + 0.5
                for key, model in (("fp", source.unet), ("quantized", qunet))}
    quantized_pipe = type(source.pipeline)(**{**source.pipeline.components, "unet": qunet})
    quantized_pipe.set_progress_bar_config(disable=True)
    return {key: pipeline_sample(pipe, [text.prompts[j % len(text.prompts)] for j in range(num_samples)],
                                 seed=args.seed, num_inference_steps=args.sampling_steps,
                                 guidance_scale=text.guidance_scale, negative_prompt=text.negative_prompt,
                                 progress=progress, desc=f"{key} samples")
            for key, pipe in (("fp", source.pipeline), ("quantized", quantized_pipe))}


def _quantize(args: argparse.Namespace, source: ModelSource, cfg: QuantConfig, text: _TextConditioning | None,
              on_prepared: Any) -> tuple[Any, float]:
    """(quantized UNet, seconds): the part every rank of a process group runs; afterwards the group is left."""
    rank, world = rank_and_world()
    t_start = time.perf_counter()
    device = calibration_device(getattr(args, "device", "cpu"))
    model = source.pipeline if text is not None else source.unet
    try:
        model.to(device)  # the float model, for calibration and reconstruction; the report runs on the CPU
        qunet = workflow.quantize(
            model, source.scheduler, cfg,
            num_inference_steps=args.calibration_steps, num_timesteps=args.calibration_timesteps,
            samples_per_timestep=args.samples_per_timestep, calibration_strategy=args.calibration_strategy,
            split=not args.no_split, reconstruct=args.recon_iters != 0, bias_correction=not args.no_bias_correction,
            correction_gain=args.correction_gain, correction_input=args.correction_input,
            timestep_groups=args.timestep_groups, prediction_spread=not getattr(args, "no_prediction_spread", False),
            choose_reconstruction=not getattr(args, "no_reconstruction_choice", False), float_tail=args.float_tail,
            reconstruction_candidates=getattr(args, "reconstruction_candidates", 2),
            precision_fallback=not args.no_precision_fallback, seed=args.seed, progress=not args.quiet,
            on_prepared=on_prepared, **(text.collect_kwargs() if text is not None else {}),
        )
    except RuntimeError as err:
        if world == 1:
            raise
        # gloo reports a dead peer ("Connection closed by peer") or a timeout as a plain RuntimeError
        raise MainJobError(f"rank {rank} of the torch.distributed group of {world} stopped: {err} (another rank "
                           "failed or timed out; see its log). Nothing was written") from None
    finally:
        model.to("cpu")
    if world > 1:
        dist.destroy_process_group()  # every rank holds the same model; rank 0 alone reports and writes
    qunet.quantization_info["world_size"] = world
    qunet.quantization_info["calibration_device"] = str(device)
    return qunet, time.perf_counter() - t_start


def _quantize_and_report(args: argparse.Namespace, source: ModelSource, cfg: QuantConfig,
                         text: _TextConditioning | None, out: Path, save_image: Any) -> dict[str, Any]:
    """Quantize and write pipeline folder, figures and report into ``out`` (the staging folder)."""
    progress = not args.quiet
    figures: dict[str, str] = {}
    extra: dict[str, Any] = {}
    unet = source.unet

    def on_prepared(prepared: Any, calib: Any) -> None:
        if cfg.act_bits is not None:
            plot_activation_ranges(prepared, out / "activation_ranges.png")
            figures["activation_ranges"] = "activation_ranges.png"
        if not args.no_split:
            rows = min(16, max(calib.timestep_histogram().values()))
            plot_split_histograms(prepared, calib.example_inputs(rows), out / "split_histograms.png")
            figures["split_histograms"] = "split_histograms.png"
        if not args.no_sensitivity:
            found = sensitivity(prepared, calib, rows_per_timestep=2, progress=progress)
            found.plot(out / "sensitivity.png")
            figures["sensitivity"] = "sensitivity.png"
            extra["sensitivity"] = found.to_dict(top=20)
            extra["sensitivity_table"] = found.format_table(10)

    qunet, quantize_s = _quantize(args, source, cfg, text, on_prepared)
    pipeline_dir = out / "pipeline"
    qunet.save_pretrained(pipeline_dir / "unet")
    with tempfile.TemporaryDirectory() as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        fp_bytes = _dir_bytes(Path(tmp))
    q_bytes = _dir_bytes(pipeline_dir / "unet")
    backend = getattr(args, "backend", "torch")
    # torch: bit-identical frozen TorchScript; openvino: the same integer model on OpenVINO's INT8 runtime. Either
    # way it is what samples below and what the reported speed measures.
    qunet.optimize_for_inference(backend=backend)

    is_digits = text is None and (unet.config.in_channels, unet.config.sample_size) == (1, bundled.IMAGE_SIZE)
    num_samples = args.num_samples or (300 if is_digits else 16 if text is not None else 64)
    samples = _samples(args, source, qunet, text, num_samples, progress)
    for key, images in samples.items():
        save_image(images[:64], out / f"samples_{key}.png", nrow=8)
    c, s = unet.config.in_channels, unet.config.sample_size
    cond = {"encoder_hidden_states": text.rows(SPEED_BATCH)} if text is not None else {}
    speed: dict[str, float] = {"batch": SPEED_BATCH}
    for key, b in (("batch_1", 1), ("batch_n", SPEED_BATCH)):
        inputs = {"sample": torch.randn(b, c, s, s), **{k: v[:b] for k, v in cond.items()}}
        speed[key] = round(speed_ratio(unet, qunet, inputs), 2)
    error_rows = min(64, num_samples)
    error_cond = {"encoder_hidden_states": text.rows(error_rows)} if text is not None else {}
    noise_err = metrics.noise_prediction_error(
        lambda sample, timestep: unet(sample, timestep, **error_cond),
        lambda sample, timestep: qunet(sample, timestep, **error_cond),
        source.scheduler, num_samples=error_rows, num_inference_steps=args.sampling_steps, sample_shape=(c, s, s),
        seed=args.seed,
    )
    calibration = {"scheduler": type(source.scheduler).__name__, "steps": args.calibration_steps,
                   "timesteps": args.calibration_timesteps, "strategy": args.calibration_strategy,
                   "samples_per_timestep": args.samples_per_timestep}
    if text is not None:
        calibration.update(prompts=text.prompts, prompts_source=text.source, guidance_scale=text.guidance_scale,
                           negative_prompt=text.negative_prompt)
    report: dict[str, Any] = {
        "model": source.name, "base_model": source.root.name if args.model is not None else "qdiff-ao digits DDPM",
        "kind": source.kind, "pipeline_class": source.pipeline_class, "scheme": cfg.name, "config": cfg.to_dict(),
        "calibration": calibration, "quantize_seconds": round(quantize_s, 1),
        "world_size": qunet.quantization_info["world_size"],
        "calibration_device": qunet.quantization_info["calibration_device"],
        "timings": qunet.quantization_info["timings"], "splits": len(qunet.quantization_info["splits"]),
        "checkpoint_bytes": q_bytes, "fp32_safetensors_bytes": fp_bytes, "size_ratio": q_bytes / fp_bytes,
        "speed_ratio_vs_fp32": speed, "inference_backend": backend, "num_samples": num_samples,
        "sampling": f"{'DDIM' if text is None else type(source.scheduler).__name__} {args.sampling_steps} steps",
        "figures": figures, "most_drifting": qunet.quantization_info["most_drifting"],
        "precision_fallback": qunet.quantization_info["precision_fallback"],
        "output_correction": qunet.quantization_info["bias_correction"],
        **{k: qunet.quantization_info.get(k) for k in ("timestep_groups", "prediction_spread", "float_tail")},
        "reconstruction_choice": (qunet.quantization_info.get("reconstruction") or {}).get("choice"),
        "attention_grids": qunet.quantization_info.get("attention_grids"),
        "noise_prediction_error_mean": float(noise_err.mean()), **extra,
    }
    if is_digits:
        metric = metrics.DigitsFD.from_bundled()
        signed = {k: v * 2 - 1 for k, v in samples.items()}  # the yardstick takes [-1, 1] samples
        report["fd"] = {k: metric.fd(v) for k, v in signed.items()}
        report["confidence"] = {k: metric.mean_confidence(v) for k, v in signed.items()}
    report["pipeline"] = pipeline_dir.name
    write_pipeline_folder(source, pipeline_dir, model_card(report))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report))
    return report


_BACKEND_WORDS = {"torch": "frozen TorchScript, fbgemm", "openvino": "OpenVINO INT8 runtime"}


def _markdown(r: dict[str, Any]) -> str:
    timings = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
    speed = r["speed_ratio_vs_fp32"]
    lines = [f"# qdiff-ao quantize: {r['model']} -> {r['scheme']}", "",
             "| measure | FP32 | quantized |", "|---|---:|---:|"]
    if "fd" in r:
        lines.append(f"| digits FD (classifier features, {r['num_samples']} samples) | {r['fd']['fp']:.3f} | "
                     f"{r['fd']['quantized']:.3f} |")
        conf = r["confidence"]
        lines.append(f"| mean classifier confidence | {conf['fp']:.3f} | {conf['quantized']:.3f} |")
    lines += [
        f"| UNet size (bytes) | {r['fp32_safetensors_bytes']:,} | {r['checkpoint_bytes']:,} "
        f"({r['size_ratio']:.3f}x) |",
        f"| UNet speed vs FP32 eager, batch 1 / {speed['batch']} (quantized: "
        f"{_BACKEND_WORDS[r.get('inference_backend', 'torch')]}) | 1.00x | "
        f"{speed['batch_1']:.2f}x / {speed['batch_n']:.2f}x |",
        f"| mean relative noise-prediction error along the FP DDIM trajectory | 0 | "
        f"{r['noise_prediction_error_mean']:.4f} |",
        "", f"Quantization took {r['quantize_seconds']} s on {r.get('calibration_device', 'cpu')} ({timings}"
        f"{'; ' + str(r['world_size']) + ' processes (torch.distributed)' if r.get('world_size', 1) > 1 else ''}); "
        f"{r['splits']} skip concats split. Samples: {r['sampling']}, same initial noise for both models.", "",
        f"Quantized pipeline: `{r['pipeline']}/` (`DiffusionPipeline.from_pretrained` loads it; model card in "
        f"`{r['pipeline']}/README.md`).", "",
        "Figures: samples_fp.png, samples_quantized.png, " + ", ".join(r["figures"].values()), "",
    ]
    if r["kind"] == "text-to-image":
        cal = r["calibration"]
        lines += [f"Calibration prompts: {len(cal['prompts'])} from {cal['prompts_source']}, guidance scale "
                  f"{cal['guidance_scale']}.", ""]
    fallback = r.get("precision_fallback")
    if fallback is not None:
        kept = ", ".join(f"`{name}`" for name in fallback["layers"]) or "none"
        lines += [f"Precision fallback (measured): layers kept in float: {kept} "
                  f"({100 * fallback['macs_fraction']:.2f}% of the quantized multiply-accumulates; "
                  f"{len(fallback['harmful'])} harmful quantizers found in {fallback['forwards']} forwards, "
                  f"{fallback.get('rounds', 1)} measurement rounds).", ""]
    correction = r.get("output_correction")
    if correction is not None and correction.get("method") == "timestep_groups":
        kinds = [g.get("kind") for g in correction["groups"]]
        lines += [f"Output correction: {correction['num_groups_kept']} of {len(correction['groups'])} timestep "
                  f"groups kept, {kinds.count('gain')} of them with a gain and {kinds.count('input')} with the "
                  "estimate from the output and the input (each only where it lowers the error on held-back "
                  "calibration rows).", ""]
    groups = r.get("timestep_groups")
    if groups is not None:
        kept_t = [f"{int(g['timesteps'][0])}-{int(g['timesteps'][-1])}" for g in groups["groups"] if g["kept"]]
        lines += [f"Timestep groups: {groups['num_groups_kept']} of {len(groups['groups'])} groups kept their own "
                  f"activation grids (timesteps {', '.join(kept_t) or 'none'}; each only where it lowers the error "
                  "on held-back calibration rows).", ""]
    spread = r.get("prediction_spread")
    if spread is not None:
        lines += [f"Denoised-spread correction: {'kept' if spread['kept'] else 'not kept'} (held-back sampler runs: "
                  f"spread mismatch to FP {spread['held_mismatch_before']:.4f} -> {spread['held_mismatch_after']:.4f}, "
                  f"rel. L2 to FP samples {spread['held_rel_l2_before']:.4f} -> {spread['held_rel_l2_after']:.4f}"
                  + (f", paired harm z {spread['held_harm_z']:.2f}" if "held_harm_z" in spread else "") + ").",
                  ""]
    choice = r.get("reconstruction_choice")
    if choice is not None:
        runs = ", ".join(f"{chr(65 + k)} {v:.4f}" for k, v in enumerate(choice["scores"]))
        best = choice.get("best_rerun", "B")  # reports before several candidates existed: B was the only rerun
        lines += [f"Reconstruction choice: run {choice['kept']} kept (distance of its samples to the float samples of "
                  f"the same noise: {runs}; {best} closer than A in {100 * choice['confidence_b_better']:.0f}% of "
                  f"bootstrap resamples, switches at {100 * SWITCH_CONFIDENCE:.0f}%; each rerun relearned "
                  f"{len(choice['redone'])} blocks of the final decoder stage).", ""]
    grids = r.get("attention_grids")
    if grids:
        sym = [g for g in grids if g["symmetric"]]
        worst = max(g["cost_bits"] for g in grids)
        lines += [f"Attention Q/K/V grids (measured): {len(sym)} of {len(grids)} symmetric (a symmetric grid costs "
                  f"at most {worst:.2f} bits here; one costing over 0.5 bits stays affine). OpenVINO runs an "
                  "attention matmul in INT8 only when both its operands are symmetric.", ""]
    if "sensitivity_table" in r:
        lines += ["Sensitivity (relative eps error caused by each quantizer alone; heat map: sensitivity.png):", "",
                  "```", r["sensitivity_table"], "```", ""]
    return "\n".join(lines)
