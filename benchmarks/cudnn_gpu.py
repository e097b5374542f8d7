"""The cuDNN INT8 path on a real GPU: numerics against the fake-quant reference, sample quality, speed.

Needs CUDA (exits with a message otherwise). For each config (symmetric int8 activations, per-tensor weights,
the kernels' only numerics) it prepares with :class:`qdiff_ao.backends.CudnnBackend` on the GPU, calibrates,
converts (weights packed by cuDNN's prepack) and reports:

- how many layers the plan lowered and how many stayed float;
- each lowered kernel against its reference module on its real input (``deploy.layer_check``: the worst layers,
  and how many are off by more than one output step);
- ``rel_l2 = |y_int8 - y_ref| / |y_ref|`` against ``convert_to_reference_fx`` of the same calibrated graph (the
  quantize -> float op -> quantize simulation of the same qparams), and against the FP model;
- on the bundled digits DDPM: FD of DDIM-50 samples from the same noise, FP32 vs the INT8 model;
- median forward time (CUDA events) of FP32, FP16 and the INT8 graph at several batch sizes.

Run once (2026-12-04, H200, torch 2.11.0+cu130), before the biased-linear rule of ``cudnn_rules`` existed: its
figures are in README ("GPU"). The run found that rule; the run with it has not happened yet.

Usage: ``python benchmarks/cudnn_gpu.py --out DIR [--calib digits_calib.safetensors]`` (the calibration set of the
digits model, made with ``--make-calib PATH`` on any machine, so the GPU run needs no sampler pass).
"""

from __future__ import annotations

import argparse
import collections
import copy
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import cifar10_ddpm_unet, unet_inputs  # noqa: E402
from qdiff_ao._compat import convert_to_reference_fx  # noqa: E402
from qdiff_ao.backends import CudnnBackend  # noqa: E402
from qdiff_ao.deploy.layer_check import check_lowered_layers  # noqa: E402

CUDNN = CudnnBackend()
W8A8 = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, act_symmetric=True, weight_granularity="per_tensor",
                            timestep_aware=False)
CONFIGS = {"W8A8": W8A8, "W4A8": dataclasses.replace(W8A8, weight_bits=4)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def gpu_time(fn: Any, iters: int = 30, warmup: int = 5) -> float:
    """Median milliseconds of ``iters`` calls, each bracketed by CUDA events."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def lower(unet: torch.nn.Module, cfg: qdiff_ao.QuantConfig, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """prepare -> calibrate -> (reference, lowered) on the GPU, with the plan's counts."""
    prepared = qdiff_ao.prepare(unet, cfg, batches[0], backend=CUDNN)
    with torch.no_grad():
        for b in batches:
            prepared(**b)
    decisions = qdiff_ao.graph_info(prepared).cudnn_decisions or ()
    reference = convert_to_reference_fx(copy.deepcopy(prepared), backend_config=CUDNN.backend_config(cfg))
    lowered = qdiff_ao.convert(prepared)
    kinds = collections.Counter(f"{type(m).__module__}.{type(m).__name__}" for m in lowered.modules())
    layers = check_lowered_layers(lowered, reference, batches[0])  # each kernel vs its reference module
    return {"reference": reference, "lowered": lowered,
            "layers_over_1_step": sum(c.lsb > 1.0 + 1e-4 for c in layers),
            "worst_layers": [dataclasses.asdict(c) for c in layers[:8]],
            "lowered_layers": sum(d.use_cudnn for d in decisions),
            "float_layers": sum(not d.use_cudnn and d.op != "add" for d in decisions),
            "quantized_modules": {k: v for k, v in kinds.items() if "quantized" in k}}


class Sampler(torch.nn.Module):
    """``unet(x, t).sample`` for a converted graph that takes (sample, timestep) and returns a tensor."""

    def __init__(self, graph: torch.nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> Any:
        out = self.graph(sample=x, timestep=torch.as_tensor(t, device=x.device).expand(x.shape[0]))
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out
        return type("Out", (), {"sample": out})()


def step(results: dict[str, Any], name: str, fn: Any) -> Any:
    """Run one section; a failure is recorded with its traceback and the run goes on."""
    t0 = time.perf_counter()
    try:
        value = fn()
        results[name] = value if not isinstance(value, dict) or "lowered" not in value else {
            k: v for k, v in value.items() if k not in ("reference", "lowered")}
        print(f"[{time.perf_counter() - t0:.1f}s] {name}: {json.dumps(results[name], default=str)[:600]}", flush=True)
        return value
    except Exception as e:  # noqa: BLE001 - a GPU check reports every failure instead of stopping at the first
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        print(f"[{time.perf_counter() - t0:.1f}s] {name} FAILED: {traceback.format_exc()}", flush=True)
        return None


def digits_section(results: dict[str, Any], calib_path: str, samples: int) -> None:
    from qdiff_ao.app.metrics import DigitsFD
    from qdiff_ao.app.model_source import load_model_folder
    from qdiff_ao.app.sampling import ddim_sample

    unet, scheduler, _ = load_model_folder(None)
    unet = unet.cuda().eval()
    calib = qdiff_ao.CalibrationSet.load(calib_path)
    batches = [{k: v.cuda() for k, v in b.items()} for _, b in calib.batches(64)]
    held = {k: v.cuda() for k, v in calib.example_inputs(64).items()}
    metric = DigitsFD.from_bundled()
    noise = torch.randn(samples, 1, 16, 16, generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        fp_out = unet(**held).sample
        fp_images = ddim_sample(unet, scheduler.config, noise, batch_size=500, progress=False)
    fp_fd = metric.fd(fp_images.cpu())
    results["digits FP32"] = {"fd": fp_fd}
    for label, cfg in CONFIGS.items():
        lowered = step(results, f"digits {label} lower", lambda cfg=cfg: lower(unet, cfg, batches))
        if lowered is None:
            continue

        def check(lowered: dict[str, Any] = lowered) -> dict[str, Any]:
            with torch.no_grad():
                out, ref = lowered["lowered"](**held), lowered["reference"](**held)
                images = ddim_sample(Sampler(lowered["lowered"]), scheduler.config, noise, batch_size=500,
                                     progress=False)
                ref_images = ddim_sample(Sampler(lowered["reference"]), scheduler.config, noise, batch_size=500,
                                         progress=False)
            fd, ref_fd = metric.fd(images.cpu()), metric.fd(ref_images.cpu())
            return {"rel_l2_vs_reference": _rel(out, ref), "rel_l2_vs_fp": _rel(out, fp_out),
                    "reference_rel_l2_vs_fp": _rel(ref, fp_out), "fd": fd, "x_fp": fd / fp_fd,
                    "reference_fd": ref_fd, "reference_x_fp": ref_fd / fp_fd,
                    "image_rel_l2_vs_reference": _rel(images, ref_images)}

        step(results, f"digits {label} check", check)


def speed_section(results: dict[str, Any], name: str, unet: Any, batch_sizes: list[int]) -> None:
    unet = unet.cuda().eval()
    batches = [{k: v.cuda() for k, v in unet_inputs(unet, 8, t, seed=t).items()} for t in range(0, 1000, 50)]
    lowered = step(results, f"{name} W8A8 lower", lambda: lower(unet, W8A8, batches))
    if lowered is None:
        return
    x = {k: v.cuda() for k, v in unet_inputs(unet, 4, 500, seed=99).items()}
    with torch.no_grad():
        fp = unet(**x).sample

    @torch.no_grad()
    def numerics() -> dict[str, float]:
        out = lowered["lowered"](**x)
        return {"rel_l2_vs_reference": _rel(out, lowered["reference"](**x)), "rel_l2_vs_fp": _rel(out, fp)}

    step(results, f"{name} W8A8 numerics", numerics)
    half = copy.deepcopy(unet).half()

    def timings() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for b in batch_sizes:
            xb = {k: v.cuda() for k, v in unet_inputs(unet, b, 500, seed=1).items()}
            xh = {k: (v.half() if v.is_floating_point() else v) for k, v in xb.items()}
            ms = {"FP32": gpu_time(lambda xb=xb: unet(**xb)), "FP16": gpu_time(lambda xh=xh: half(**xh)),
                  "INT8 cuDNN": gpu_time(lambda xb=xb: lowered["lowered"](**xb))}
            out[f"batch {b}"] = {k: f"{v:.2f} ms ({ms['FP32'] / v:.2f}x FP32)" for k, v in ms.items()}
        return out

    step(results, f"{name} speed", timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="cudnn_gpu")
    parser.add_argument("--calib", help="digits calibration set (safetensors) made by --make-calib")
    parser.add_argument("--make-calib", help="write the digits calibration set here and exit (any machine)")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    if args.make_calib:
        from qdiff_ao.app.model_source import load_model_folder

        unet, scheduler, _ = load_model_folder(None)
        qdiff_ao.collect_calibration_data(unet, scheduler, num_inference_steps=50, num_timesteps=25,
                                          samples_per_timestep=64, progress=False).save(args.make_calib)
        return
    if not torch.cuda.is_available():
        sys.exit("benchmarks/cudnn_gpu.py needs a CUDA GPU; torch.cuda.is_available() is False here")
    torch.backends.cudnn.benchmark = True
    results: dict[str, Any] = {"env": {
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(), "has_cudnn": torch._C._has_cudnn}}
    print(results["env"], flush=True)
    if args.calib:
        step(results, "digits", lambda: digits_section(results, args.calib, args.samples))
    speed_section(results, "cifar10 real config", cifar10_ddpm_unet(0), [1, 8, 64])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cudnn_gpu.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
