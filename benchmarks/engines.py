"""Every CPU engine on one model, in one process, interleaved rounds (#19 item 5).

    python benchmarks/engines.py --model cifar10 [--batches 1 8] [--rounds 5] [--iters 3] [--compile]
    python benchmarks/engines.py --model sd-shaped --batches 1 2
    python benchmarks/engines.py --model cifar10-32heads | bundled

Rows (each skipped, with a note, when its package is missing):

* FP32 eager (the diffusers UNet; the baseline of every ratio), torch.compile FP32 (``--compile``: minutes of
  compilation on 2 cores), ONNX Runtime FP32 and OpenVINO FP32 on the traced float graph's ONNX export;
* OpenVINO + NNCF INT8: NNCF's own post-training quantization (``nncf.quantize``, its defaults, the 4 calibration
  batches below) of the float OpenVINO model;
* ONNX Runtime INT8 on our Q/DQ export (the default W4A8 configuration);
* ours, W4A8 with the default quantized attention and with float attention (``quantize_attention=False``), each
  on fbgemm (``QuantizedUNet.optimize_for_inference()``, frozen TorchScript) and on OpenVINO
  (``optimize_for_inference(backend="openvino")``); on OpenVINO also the quantized attention with Q, K, V given
  symmetric grids where they cost at most half a bit (``attention_symmetric="measured"``), which OpenVINO runs in
  INT8 (the default affine ones it runs in f32).

Calibration is plain (4 batches of 4 at timesteps 950/700/400/100, random weights except ``bundled``); speed does
not depend on the quality of the qparams. Ratios: median over rounds of FP32_time / variant_time, every variant
timed back to back in each round (``benchmarks.common.interleaved_ratios``). Every engine gets ``--threads``
threads (ORT without spinning). Also printed: each engine's output vs our fbgemm lowering (relative L2), and which
layers OpenVINO runs in 8 bits on our export.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import (  # noqa: E402
    bundled_unet,
    cifar10_ddpm_unet,
    interleaved_ratios,
    ort_runner,
    quantize_plain,
    sd_shaped_unet,
    unet_inputs,
)
from benchmarks.machine import cpu_flags  # noqa: E402
from qdiff_ao.deploy.openvino_runtime import OpenVINOModel  # noqa: E402

Runner = Callable[[dict[str, torch.Tensor]], Any]


def _have(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _float_onnx(unet: torch.nn.Module, example: dict[str, torch.Tensor], path: Path) -> Path:
    traced = qdiff_ao.trace(unet, example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(traced, tuple(example.values()), str(path), input_names=list(example),
                          output_names=["output"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in [*example, "output"]})
    return path


def _openvino(model: Any, threads: int) -> Runner:
    """An OpenVINO model compiled per input shape with the backend's settings (f32 float layers)."""
    compiled = OpenVINOModel(model, threads=threads)
    return lambda x: compiled(**x)


def _nncf_int8(float_path: Path, calib: list[dict[str, torch.Tensor]], threads: int) -> Runner:
    import nncf
    import openvino as ov

    model = ov.Core().read_model(str(float_path))
    dataset = nncf.Dataset(calib, lambda b: {k: v.numpy() for k, v in b.items()})
    return _openvino(nncf.quantize(model, dataset, subset_size=len(calib)), threads)


def build(unet: torch.nn.Module, workdir: Path, threads: int, compile_fp32: bool) -> tuple[dict[str, Runner], str]:
    calib = [unet_inputs(unet, 4, t, seed=i) for i, t in enumerate((950, 700, 400, 100))]
    rows: dict[str, Runner] = {"FP32 eager": lambda x: unet(**x).sample}
    notes = []
    if compile_fp32:
        compiled = torch.compile(unet)
        rows["torch.compile FP32"] = lambda x: compiled(**x).sample
    float_path = _float_onnx(unet, calib[0], workdir / "fp32.onnx")
    if _have("onnxruntime"):
        rows["ONNX Runtime FP32"] = ort_runner(float_path, threads)
    else:
        notes.append("onnxruntime missing: its rows skipped (pip install 'qdiff_ao[onnx]')")
    if _have("openvino"):
        import openvino as ov

        rows["OpenVINO FP32"] = _openvino(ov.Core().read_model(str(float_path)), threads)
        if _have("nncf"):
            rows["OpenVINO + NNCF INT8 (its own PTQ)"] = _nncf_int8(float_path, calib, threads)
        else:
            notes.append("nncf missing: OpenVINO + NNCF row skipped (pip install nncf)")
    else:
        notes.append("openvino missing: its rows skipped (pip install 'qdiff_ao[openvino]')")
    like = unet
    variants = (("default, quantized attention", {}), ("float attention", {"quantize_attention": False}),
                ("quantized attention, measured Q/K/V grids", {"attention_symmetric": "measured"}))
    for label, kwargs in variants:
        quantize_attention = kwargs.get("quantize_attention", True)
        default = not kwargs
        cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8, **kwargs)
        gm = quantize_plain(unet, cfg, calib)
        if default and _have("onnxruntime"):
            path = workdir / "ours.onnx"
            qdiff_ao.export_onnx(gm, path, calib[0])
            rows["ONNX Runtime INT8 on our export"] = ort_runner(path, threads)
        if not quantize_attention or default:  # fbgemm: the integer attention takes any zero points, grids cost little
            fb = qdiff_ao.QuantizedUNet(gm, like=like).eval().optimize_for_inference()
            rows[f"ours W4A8 {label}, fbgemm"] = lambda x, m=fb: m(**x).sample
        if _have("openvino"):
            ovm = qdiff_ao.QuantizedUNet(gm, like=like).eval().optimize_for_inference(backend="openvino",
                                                                                       threads=threads)
            rows[f"ours W4A8 {label}, OpenVINO"] = lambda x, m=ovm: m(**x).sample
            if quantize_attention:
                print(f"[{label}]", end=" ")
                _print_int8_census(ovm._frozen[0], unet)
    return rows, "; ".join(notes)


def _print_int8_census(compiled: Any, unet: torch.nn.Module) -> None:
    layers = compiled.runtime_precisions(unet_inputs(unet, 1, 500, seed=1))
    int8 = {k: n for (k, p), n in layers.items() if p in ("u8", "i8") and k not in ("Const", "Reorder")}
    kept = {k: n for (k, p), n in layers.items() if p == "f32" and k in ("Convolution", "FullyConnected", "MatMul",
                                                                           "Subgraph", "MVN")}
    print(f"OpenVINO on our export, executed layers in 8 bits: {int8}; in f32 (selected): {kept}")


def agreement(rows: dict[str, Runner], unet: torch.nn.Module) -> None:
    x = unet_inputs(unet, 2, 500, seed=3)
    with torch.no_grad():
        ref = rows["ours W4A8 default, quantized attention, fbgemm"](x)
        fp = rows["FP32 eager"](x)
        print("\nOutput vs our fbgemm lowering (default config), relative L2, batch 2 at t=500:")
        for name, fn in rows.items():
            out = fn(x)
            print(f"- {name}: {float((out - ref).norm() / ref.norm()):.4f} (vs FP32: "
                  f"{float((out - fp).norm() / fp.norm()):.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["cifar10", "cifar10-32heads", "sd-shaped", "bundled"], default="cifar10")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add a torch.compile FP32 row (slow to compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    unet = {"cifar10": lambda: cifar10_ddpm_unet(), "cifar10-32heads": lambda: cifar10_ddpm_unet(heads32=True),
            "sd-shaped": sd_shaped_unet, "bundled": bundled_unet}[args.model]()
    if unet is None:
        sys.exit("the bundled model is not in the package")
    versions = [f"torch {torch.__version__}"] + [f"{m} {__import__(m).__version__}" for m in
                                                 ("onnxruntime", "openvino", "nncf") if _have(m)]
    print(f"{args.model}: {', '.join(versions)}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, flags: {cpu_flags()}; threads {args.threads}")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        t0 = time.perf_counter()
        rows, notes = build(unet, Path(tmp), args.threads, args.compile)
        print(f"built {len(rows)} rows in {time.perf_counter() - t0:.0f} s. {notes}")
        print(f"\n| engine | {' | '.join(f'batch {b}: ratio vs FP32 eager (ms)' for b in args.batches)} |")
        print("|---|" + "---|" * len(args.batches))
        for name, cells in interleaved_ratios(rows, unet, args.batches, args.rounds, args.iters).items():
            print(f"| {name} | {' | '.join(cells)} |")
        agreement(rows, unet)


if __name__ == "__main__":
    main()
