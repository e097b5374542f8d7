"""The quality table on every model of the zoo: FP32 vs Q-Diffusion (ours) with the defaults, and ablations.

    python benchmarks/quality.py --model digits [--seeds 2] [--num-samples 1000] [--steps 50] [--out docs/quality]
    python benchmarks/quality.py --model shapes32
    python benchmarks/quality.py --model shapes16-cond
    python benchmarks/quality.py --model digits --seeds 1 --only "W4A8 (defaults)" --backends torch openvino

Every row samples with the same sampler (DDIM, --steps steps, eta 0) from the same initial noise per seed;
class-conditional models sample with classifier-free guidance (class j mod K for sample j). Columns: FD in the
model's own classifier features (digits: ``qdiff_ao.app.metrics.DigitsFD``; zoo: ``qdiff_ao.app.zoo.yardstick``),
as mean ± std over seeds, and **x FP**: each seed's FD divided by the FP32 FD of the same seed, mean ± std;
mean relative noise-prediction error along the FP DDIM trajectory, and the same over its last 5 steps; how far
the model's own trajectories end from the FP samples of the same noise (image relative L2, and contrast: pixel
standard deviation over the FP one); checkpoint size; latency vs FP32 (batch 8, median of interleaved rounds).
Layers kept in float by the precision fallback are listed.

Rows: FP32; ours with the defaults at W8A8, W4A8 and weights-only W4; ablations of W4A8 that remove one default
step each (the precision fallback, the timestep groups, the output correction -- or add its input term or gains
to it, or replace it by the single static bias of ``passes.correct_output_bias`` --, split shortcuts, reconstruction
or its step-size phase; with classifier-free guidance also the guided reconstruction loss, at W4A8 and W8A8). The
output-correction variants share one reconstruction (the prepared graph is copied before the correction), so they
differ in that step alone.

``--recon-seeds 0 1 2`` repeats every quantized row with each reconstruction seed (``ReconstructionConfig.seed``:
the rows cached and the mini-batch draws), labelled ``[recon seed k]``, and adds a summary of each row's x FP
over those seeds: the spread of the quantization run itself, which the noise seeds alone do not show.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from qdiff_ao.app.main_job import speed_ratio  # noqa: E402
from qdiff_ao.app.metrics import DigitsFD, frechet_distance, noise_prediction_error  # noqa: E402
from qdiff_ao.app.model_source import load_model_folder  # noqa: E402
from qdiff_ao.app.sampling import ddim_sample, initial_noise  # noqa: E402
from qdiff_ao.workflow import scoring_sampler  # noqa: E402

MODELS = ("digits", "shapes32", "shapes16-cond")
SPREAD_BY_DEFAULT = inspect.signature(qdiff_ao.quantize).parameters["prediction_spread"].default
"""Whether quantize's defaults include the denoised-spread correction (the correction variants re-fit it)."""


@dataclass
class Subject:
    """A model under test: float UNet, scheduler, the sampling wrapper and the FD yardstick."""

    name: str
    unet: Any
    scheduler: Any
    denoiser: Callable[[Any], Any]
    fd: Callable[[torch.Tensor], float]
    calib_kwargs: dict[str, Any]
    features: Callable[[torch.Tensor], torch.Tensor]  # the yardstick's classifier features


def load_subject(name: str) -> Subject:
    if name == "digits":
        unet, scheduler, _ = load_model_folder(None)
        metric = DigitsFD.from_bundled()
        return Subject(name, unet, scheduler, lambda u: u, metric.fd, {}, metric.features)
    from qdiff_ao.app.zoo.sampling import load_zoo
    from qdiff_ao.app.zoo.yardstick import ShapesFD

    zoo = load_zoo(name)
    metric = ShapesFD.for_zoo(name)
    return Subject(name, zoo.unet, zoo.scheduler, zoo.denoiser, metric.fd, zoo.calibration_kwargs(), metric.features)


def rows() -> list[dict[str, Any]]:
    w4a8 = qdiff_ao.QuantConfig()
    return [
        dict(label="ours W8A8", cfg=qdiff_ao.QuantConfig(weight_bits=8, act_bits=8)),
        dict(label="ours W8A8, no denoised-spread correction", cfg=qdiff_ao.QuantConfig(weight_bits=8, act_bits=8),
             kwargs=dict(prediction_spread=False)),
        dict(label="ours W8A8, no output correction", cfg=qdiff_ao.QuantConfig(weight_bits=8, act_bits=8),
             kwargs=dict(bias_correction=False)),
        dict(label="ours W8A8, float tail (opt-in)", cfg=qdiff_ao.QuantConfig(weight_bits=8, act_bits=8),
             kwargs=dict(float_tail=True)),
        dict(label="ours W8A8, no timestep groups (one activation grid)",
             cfg=qdiff_ao.QuantConfig(weight_bits=8, act_bits=8), kwargs=dict(timestep_groups=1)),
        dict(label="ours W4A8 (defaults)", cfg=w4a8, variants={
            "ours W4A8 (defaults)": "offsets",
            "ours W4A8, no denoised-spread correction": "no spread",
            "ours W4A8, output correction with the input term (a y + c x - b)": "input",
            "ours W4A8, output correction with PTQD gains as well": "gains",
            "ours W4A8, static output bias instead of grouped correction": "static",
            "ours W4A8, no output correction": "none"}),
        dict(label="ours W4A8, float tail (opt-in)", cfg=w4a8, kwargs=dict(float_tail=True)),
        dict(label="ours W4A8, measured Q/K/V grids (opt-in)",
             cfg=dataclasses.replace(w4a8, attention_symmetric="measured")),
        dict(label="ours W8A8, measured Q/K/V grids (opt-in)",
             cfg=qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, attention_symmetric="measured")),
        dict(label="ours W4A32 (weights only)", cfg=qdiff_ao.QuantConfig(act_bits=None)),
        dict(label="ours W4A8, no precision fallback", cfg=w4a8, kwargs=dict(precision_fallback=False)),
        dict(label="ours W4A8, no split", cfg=w4a8, kwargs=dict(split=False)),
        dict(label="ours W4A8, no reconstruction", cfg=w4a8, kwargs=dict(reconstruct=False)),
        dict(label="ours W4A8, 3 reconstruction candidates", cfg=w4a8, kwargs=dict(reconstruction_candidates=3)),
        dict(label="ours W4A8, no timestep groups (one activation grid)", cfg=w4a8, kwargs=dict(timestep_groups=1)),
        dict(label="ours W4A8, 3x reconstruction iterations (900 + 150 per block)", cfg=dataclasses.replace(
            w4a8, reconstruction=dataclasses.replace(w4a8.reconstruction, weight_iters=900, act_iters=150))),
        dict(label="ours W4A8, every calibration row in reconstruction (4 GiB cache)", cfg=dataclasses.replace(
            w4a8, reconstruction=dataclasses.replace(w4a8.reconstruction, max_cache_bytes=4 * 2**30))),
        dict(label="ours W4A8, no activation step-size learning", cfg=dataclasses.replace(
            w4a8, reconstruction=dataclasses.replace(w4a8.reconstruction, act_iters=0))),
        dict(label="ours W4A8, reconstruction without the guided loss", cfg=w4a8, guided_only=True,
             kwargs=dict(guided_reconstruction=False)),
        dict(label="ours W8A8, reconstruction without the guided loss", cfg=qdiff_ao.QuantConfig(weight_bits=8),
             guided_only=True, kwargs=dict(guided_reconstruction=False)),
    ]


def fp_floor_row(subject: Subject, args: argparse.Namespace, fp_images: list[torch.Tensor], fp_fds: list[float],
                 cache: Path) -> dict[str, Any]:
    """The float model again from other noise (seeds after the FP row's): how far a fresh draw moves the samples
    in the yardstick's features (``fd_to_fp``) and its FD to the data, the scale a quantized row's ``fd_to_fp``
    is read against. Cached next to the FP row."""
    if cache.is_file():
        return cast(dict[str, Any], json.loads(cache.read_text()))
    fds, to_fp = [], []
    for i, ref in enumerate(fp_images):
        noise = initial_noise(subject.unet, args.num_samples, seed=1000 + args.seeds + i)
        images = ddim_sample(subject.denoiser(subject.unet), subject.scheduler.config, noise,
                             num_inference_steps=args.steps, batch_size=100, progress=False)
        fds.append(subject.fd(images))
        to_fp.append(frechet_distance(subject.features(images), subject.features(ref)))
    ratios = [f / r for f, r in zip(fds, fp_fds, strict=True)]
    row = {"label": "FP32, other noise (a fresh draw: the scale of FD to FP)", "fd_mean": statistics.mean(fds),
           "fd_std": statistics.pstdev(fds), "fds": fds, "ratio_mean": statistics.mean(ratios),
           "ratio_std": statistics.pstdev(ratios),
           "eps_error": float("nan"), "eps_error_last5": float("nan"), "image_rel_l2": float("nan"),
           "contrast": float("nan"), "fd_to_fp": statistics.mean(to_fp), "size_bytes": float("nan"),
           "latency_ratio": float("nan"), "seconds": 0.0,
           "keep_float": []}
    cache.write_text(json.dumps(row, indent=2))
    return row


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def evaluate(label: str, model: Any, subject: Subject, args: argparse.Namespace, noises: list[torch.Tensor],
             fp_fds: list[float] | None, fp_images: list[torch.Tensor] | None = None,
             keep_images: list[torch.Tensor] | None = None) -> dict[str, Any]:
    """FD per noise seed, x FP, the eps error along the FP trajectory and, given the FP images of the same noise,
    how far this model's own trajectories end from them: ``image_rel_l2 = |x_q - x_fp| / |x_fp|`` over all
    samples, ``contrast = std(x_q) / std(x_fp)`` (pixel standard deviation) and ``fd_to_fp``, the Frechet
    distance between the two sample sets' features (0 for the same images; it does not depend on how far the
    float model itself is from the data, which the FD ratio does), means over seeds."""
    fds, rel_l2, contrast, fd_to_fp = [], [], [], []
    for i, noise in enumerate(noises):
        images = ddim_sample(subject.denoiser(model), subject.scheduler.config, noise, num_inference_steps=args.steps,
                             batch_size=100, progress=False)
        fds.append(subject.fd(images))
        if keep_images is not None:
            keep_images.append(images)
        if fp_images is not None:
            ref = fp_images[i]
            rel_l2.append(float((images - ref).norm() / ref.norm()))
            contrast.append(float(images.std() / ref.std()))
            fd_to_fp.append(frechet_distance(subject.features(images), subject.features(ref)))
        safe = "".join(c if c.isalnum() else "_" for c in label)
        if i == 0 and args.grids:
            from torchvision.utils import save_image

            save_image(images[:64] * 0.5 + 0.5, Path(args.out) / f"samples_{subject.name}_{safe}.png", nrow=8)
        if i == 0 and args.save_samples:
            torch.save(images, Path(args.out) / f"samples_{subject.name}_{safe}.pt")
    err = noise_prediction_error(subject.denoiser(subject.unet), subject.denoiser(model), subject.scheduler,
                                 num_samples=32, num_inference_steps=args.steps,
                                 sample_shape=tuple(noises[0].shape[1:]), seed=0)
    ratios = [q / f for q, f in zip(fds, fp_fds or fds, strict=True)]
    out = {"fd_mean": statistics.mean(fds), "fd_std": statistics.pstdev(fds), "fds": fds,
           "ratio_mean": statistics.mean(ratios), "ratio_std": statistics.pstdev(ratios),
           "eps_error": float(err.mean()), "eps_error_last5": float(err[-5:].mean())}
    if fp_images is not None:
        out |= {"image_rel_l2": statistics.mean(rel_l2), "contrast": statistics.mean(contrast),
                "fd_to_fp": statistics.mean(fd_to_fp)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="digits")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50, help="DDIM sampling steps")
    parser.add_argument("--calib-steps", type=int, default=100)
    parser.add_argument("--calib-timesteps", type=int, default=20)
    parser.add_argument("--samples-per-timestep", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=None, help="row labels to run (substring match; "
                        "a leading '=' asks for the exact label, e.g. '=ours W8A8')")
    parser.add_argument("--out", default="docs/quality")
    parser.add_argument("--grids", action="store_true", help="write a sample grid per row")
    parser.add_argument("--save-samples", action="store_true", help="write each row's samples of the first noise "
                        "seed to samples_<model>_<row>.pt (for offline analysis, e.g. per-class accuracy)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-floor", action="store_true", help="skip the row of float samples from other noise "
                        "(the scale of FD to FP; it samples the float model once more)")
    parser.add_argument("--recon-seeds", type=int, nargs="+", default=[0],
                        help="reconstruction seeds; more than one repeats every quantized row with each")
    parser.add_argument("--backends", nargs="+", choices=["torch", "openvino"], default=["torch"],
                        help="engines each quantized row is evaluated on (the same quantized model on each; "
                        "openvino rows are labelled [openvino])")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    subject = load_subject(args.model)
    unet, scheduler = subject.unet, subject.scheduler
    noises = [initial_noise(unet, args.num_samples, seed=1000 + s) for s in range(args.seeds)]
    calib = qdiff_ao.collect_calibration_data(
        unet, scheduler, num_inference_steps=args.calib_steps, num_timesteps=args.calib_timesteps,
        samples_per_timestep=args.samples_per_timestep, seed=0, progress=False, **subject.calib_kwargs)

    # The FP32 row is deterministic (fixed weights, noise and sampler): cached per model and sampling settings,
    # so a rerun of a few rows does not sample the float model again.
    fp_cache = Path(args.out) / f"fp_{args.model}_{args.seeds}x{args.num_samples}_ddim{args.steps}.json"
    images_cache = fp_cache.with_suffix(".images.pt")  # the FP samples, for the image distance columns
    if fp_cache.is_file() and images_cache.is_file():
        fp = json.loads(fp_cache.read_text())
        fp_images = torch.load(images_cache)
        print(f"[{args.model}] FP32 row read from {fp_cache}", flush=True)
    else:
        fp_images = []
        fp = evaluate("FP32", unet, subject, args, noises, None, keep_images=fp_images)
        fp_cache.write_text(json.dumps(fp, indent=2))
        torch.save(fp_images, images_cache)
    with tempfile.TemporaryDirectory() as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
        fp_bytes = _dir_bytes(Path(tmp))
    results = [{"label": "FP32", **fp, "size_bytes": fp_bytes, "latency_ratio": 1.0, "seconds": 0.0,
                "keep_float": [], "image_rel_l2": 0.0, "contrast": 1.0, "fd_to_fp": 0.0}]
    print(f"[{args.model}] FP32: FD {fp['fd_mean']:.3f} ± {fp['fd_std']:.3f}", flush=True)
    if not args.no_floor:
        results.append(fp_floor_row(subject, args, fp_images, fp["fds"], fp_cache.with_suffix(".floor.json")))
    c, s = unet.config.in_channels, unet.config.sample_size
    x8 = torch.randn(8, c, s, s)
    speed_kwargs = {}
    if subject.calib_kwargs:
        speed_kwargs = {"encoder_hidden_states": subject.calib_kwargs["encoder_hidden_states"][:1].expand(8, -1, -1)}

    def finish(label: str, qunet: Any, seconds: float) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            qunet.save_pretrained(Path(tmp) / "ckpt")
            size = _dir_bytes(Path(tmp) / "ckpt")
        for backend in args.backends:  # the same quantized model on each engine
            # torch: bit-identical frozen TorchScript, several times faster to sample with than the GraphModule
            qunet.optimize_for_inference(backend=backend)
            row = label if backend == "torch" else f"{label} [{backend}]"
            res = {"label": row, **evaluate(row, qunet, subject, args, noises, fp["fds"], fp_images),
                   "size_bytes": size, "latency_ratio": speed_ratio(unet, qunet, {"sample": x8, **speed_kwargs}),
                   "seconds": seconds,
                   "keep_float": list(qunet.quantization_info["config"]["keep_float"]),
                   "float_tail_below": (qunet.quantization_info.get("float_tail") or {}).get("below"),
                   "reconstruction_choice": (qunet.quantization_info.get("reconstruction") or {}).get("choice"),
                   # the passes' keep/drop decisions (None where the row's correction pass did not run)
                   "spread_kept": (qunet.quantization_info.get("prediction_spread") or {}).get("kept"),
                   "spread_harm_z": (qunet.quantization_info.get("prediction_spread") or {}).get("held_harm_z"),
                   "output_correction_groups_kept": (qunet.quantization_info.get("bias_correction") or {}).get(
                       "num_groups_kept")}
            results.append(res)
            write_tables(args, results)
        print(f"[{args.model}] {label}: FD {res['fd_mean']:.3f} ± {res['fd_std']:.3f} = {res['ratio_mean']:.3f}x FP "
              f"(eps err {res['eps_error']:.4f}, last 5 {res['eps_error_last5']:.4f}; image rel. L2 "
              f"{res['image_rel_l2']:.4f}, contrast {res['contrast']:.4f}, FD to FP {res['fd_to_fp']:.2f}; "
              f"{seconds:.0f} s; float "
              f"{res['keep_float']})", flush=True)

    for recon_seed in args.recon_seeds:
        tag = f" [recon seed {recon_seed}]" if len(args.recon_seeds) > 1 else ""
        for row in rows():
            variants = row.get("variants", {})
            wanted = [label for label in (row["label"], *variants)
                      if not args.only or any(label == o[1:] if o.startswith("=") else o in label for o in args.only)]
            if not wanted or (row.get("guided_only") and calib.guidance_pair is None):  # same as defaults w/o CFG
                continue
            cfg = dataclasses.replace(row["cfg"], reconstruction=dataclasses.replace(
                row["cfg"].reconstruction, seed=recon_seed))
            captured: dict[str, Any] = {}

            def capture(prepared: Any, _calib: Any, captured: dict[str, Any] = captured) -> None:
                captured["prepared"] = copy.deepcopy(prepared)

            t0 = time.perf_counter()
            kwargs = dict(row.get("kwargs", {}))
            if variants:  # every correction variant, the defaults included, starts from the uncorrected graph
                kwargs["bias_correction"] = False
                kwargs["prediction_spread"] = False  # fitted after the variant's correction, as quantize does
            qunet = qdiff_ao.quantize(unet, scheduler, cfg, calib=calib, progress=False,
                                      on_prepared=capture if variants else None, **kwargs, **subject.calib_kwargs)
            seconds = time.perf_counter() - t0
            if not variants:
                finish(row["label"] + tag, qunet, seconds)
            for label, variant in variants.items():
                if label not in wanted:
                    continue
                prepared = copy.deepcopy(captured["prepared"])
                try:
                    if variant in ("offsets", "no spread", "input", "gains"):
                        qdiff_ao.passes.correct_output(prepared, calib, unet, gain=variant == "gains",
                                                       input_term=variant == "input")
                    elif variant == "static":
                        qdiff_ao.passes.correct_output_bias(prepared, calib, unet)
                    if variant != "no spread" and SPREAD_BY_DEFAULT:
                        qdiff_ao.passes.match_prediction_spread(  # on DDIM runs, as quantize fits it
                            prepared, calib, unet, scoring_sampler(scheduler), seed=0,
                            **subject.calib_kwargs)
                except ValueError as err:  # e.g. the output layer was kept in float: no bias to fold into
                    print(f"[{args.model}] {label}: skipped ({err})", flush=True)
                    continue
                info = qdiff_ao.graph_info(prepared)  # this variant's own correction decisions
                decisions = {"bias_correction": info.bias_correction, "prediction_spread": info.prediction_spread}
                variant_qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
                variant_qunet.quantization_info = {**qunet.quantization_info, **decisions}
                finish(label + tag, variant_qunet, seconds)
    write_tables(args, results)


def _recon_seed_spread(results: list[dict[str, Any]]) -> dict[str, list[float]]:
    """{row label without its " [recon seed k]" tag: [x FP of each reconstruction seed]} for rows run with several."""
    out: dict[str, list[float]] = {}
    for r in results:
        label, sep, _ = r["label"].partition(" [recon seed ")
        if sep:
            out.setdefault(label, []).append(r["ratio_mean"])
    return {k: v for k, v in out.items() if len(v) > 1}


def write_tables(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    """quality_<model>.md / .json in --out (rewritten after every row, so a stopped run keeps what it measured)."""
    fd_head = f"FD ↓ (mean ± std, {args.seeds} seeds × {args.num_samples} samples)"
    table = [f"| {args.model} | {fd_head} | x FP (per seed) | eps error | eps error, last 5 steps | image rel. L2 vs "
             "FP | contrast vs FP | FD to FP samples | size (KiB) | latency vs FP32 (batch 8) | layers kept in float |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        table.append(f"| {r['label']} | {r['fd_mean']:.2f} ± {r['fd_std']:.2f} | {r['ratio_mean']:.3f} ± "
                     f"{r['ratio_std']:.3f} | {r['eps_error']:.4f} | {r['eps_error_last5']:.4f} | "
                     f"{r.get('image_rel_l2', float('nan')):.4f} | {r.get('contrast', float('nan')):.4f} | "
                     f"{r.get('fd_to_fp', float('nan')):.2f} | "
                     f"{r['size_bytes'] / 1024:.0f} | {r['latency_ratio']:.2f}x | {', '.join(r['keep_float'])} |")
    spread = _recon_seed_spread(results)
    if spread:
        table += ["", "| row | x FP over reconstruction seeds (mean ± std) | per seed |", "|---|---:|---|"]
        table += [f"| {label} | {statistics.mean(v):.3f} ± {statistics.pstdev(v):.3f} | "
                  f"{', '.join(f'{x:.3f}' for x in v)} |" for label, v in spread.items()]
    text = "\n".join(table)
    print("\n" + text)
    meta = {"model": args.model, "sampler": f"DDIM {args.steps} steps, eta 0", "args": vars(args),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    (Path(args.out) / f"quality_{args.model}.json").write_text(
        json.dumps({"meta": meta, "rows": results}, indent=2, default=str))
    (Path(args.out) / f"quality_{args.model}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
