"""ONNX Runtime INT8 (QDQ export) vs FP32 eager vs qdiff_ao's torch lowerings, interleaved rounds in one process.

    python benchmarks/onnx_speed.py [--rounds 7] [--iters 3] [--batches 1 8] [--threads 2]

Model: google/ddpm-cifar10-32's architecture with random weights (no download), calibrated on 4 batches at
timesteps 950/700/400/100. Variants: FP32 eager (diffusers), ORT FP32 (the traced float graph exported to ONNX),
qdiff_ao W8A8 / W4A8 lowered to fbgemm (``qdiff_ao.convert``; also with float SDPA attention as frozen TorchScript,
the fast setting), and the same two calibrated graphs exported with
``export_onnx`` and run by ONNX Runtime's CPU provider (QLinearConv / QGemm / MatMulIntegerToFloat after its QDQ
fusions). Every round times each variant back to back (median of --iters forwards); the table reports the median
over rounds of FP32_eager_time / variant_time. ORT sessions use --threads intra-op threads with
``session.intra_op.allow_spinning = 0`` (spinning threads would steal the cores the next variant times on).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import (  # noqa: E402
    cifar10_ddpm_unet,
    interleaved_ratios,
    ort_runner,
    quantize_plain,
    unet_inputs,
)
from qdiff_ao.deploy.freezing import freeze_graph  # noqa: E402
from qdiff_ao.deploy.onnx.export import export_onnx  # noqa: E402


def build(unet: torch.nn.Module, workdir: Path, threads: int) -> dict[str, Callable[[dict[str, torch.Tensor]], object]]:
    calib = [unet_inputs(unet, 4, t, seed=i) for i, t in enumerate((950, 700, 400, 100))]
    variants: dict[str, Callable[[dict[str, torch.Tensor]], object]] = {"FP32 eager": lambda x: unet(**x).sample}
    traced = qdiff_ao.trace(unet, calib[0])
    float_path = workdir / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(traced, tuple(calib[0].values()), str(float_path), input_names=list(calib[0]),
                          output_names=["output"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch"} for n in [*calib[0], "output"]})
    variants["ORT FP32"] = ort_runner(float_path, threads)
    for wb in (8, 4):
        t0 = time.perf_counter()
        cfg = qdiff_ao.QuantConfig(weight_bits=wb, act_bits=8)
        prepared = qdiff_ao.prepare(unet, cfg, calib[0])
        with torch.no_grad():
            for batch in calib:
                prepared(**batch)
        path = workdir / f"w{wb}a8.onnx"
        report = export_onnx(prepared, path, calib[0])
        lowered = qdiff_ao.convert(prepared)
        variants[f"qdiff_ao W{wb}A8 (fbgemm)"] = lambda x, gm=lowered: gm(**x)
        variants[f"ORT INT8 QDQ W{wb}A8"] = ort_runner(path, threads)
        fast = quantize_plain(unet, qdiff_ao.QuantConfig(weight_bits=wb, act_bits=8, quantize_attention=False),
                                    calib)
        frozen = freeze_graph(fast, unet_inputs(unet, 1, 500, seed=7))
        variants[f"qdiff_ao W{wb}A8, float SDPA attention, frozen (fbgemm)"] = lambda x, m=frozen: m(**x)
        x = unet_inputs(unet, 2, 500, seed=3)
        with torch.no_grad():
            a, b = variants[f"ORT INT8 QDQ W{wb}A8"](x), lowered(**x)
        rel = float((a - b).norm() / b.norm())
        print(f"W{wb}A8: {report.activation_qdq} activation Q/DQ, {report.weight_qdq} weight Q/DQ, "
              f"{report.quantized_biases} int32 biases; ORT vs fbgemm lowering rel. L2 {rel:.3f}; "
              f"built in {time.perf_counter() - t0:.0f} s")
    return variants


def bench(variants: dict[str, Callable[[dict[str, torch.Tensor]], object]], unet: torch.nn.Module,
          batches: list[int], rounds: int, iters: int) -> None:
    print(f"\n| variant | {' | '.join(f'batch {b}: speed-up vs FP32 eager (ms)' for b in batches)} |")
    print("|---|" + "---|" * len(batches))
    for v, row in interleaved_ratios(variants, unet, batches, rounds, iters).items():
        print(f"| {v} | {' | '.join(row)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=3, help="forwards per timing (median)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        import onnxruntime as ort
    except ImportError:
        sys.exit("needs onnx and onnxruntime: pip install 'qdiff_ao[onnx]'")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__} (threads {args.threads}), onnxruntime {ort.__version__} (intra-op threads "
          f"{args.threads}, no spinning); google/ddpm-cifar10-32 configuration (single-head attention), random weights")
    unet = cifar10_ddpm_unet()
    with tempfile.TemporaryDirectory() as tmp:
        variants = build(unet, Path(tmp), args.threads)
        bench(variants, unet, args.batches, args.rounds, args.iters)


if __name__ == "__main__":
    main()
