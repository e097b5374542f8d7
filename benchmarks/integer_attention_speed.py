"""Quantized attention on fbgemm with and without the integer-matmul kernel, against float attention.

Model level (default): W4A8 plain calibration (4 batches), frozen TorchScript, ratio vs FP32 eager over
interleaved rounds (``benchmarks.common.interleaved_ratios``):

- ``fbgemm default``: ``convert_fx``'s f32 attention matmuls on grid values (``integer_attention=False``);
- ``fbgemm default, integer attention``: ``deploy.integer_attention`` (the ``optimize_for_inference`` default),
  with the GEMM of the codes measured per block shape (the default) and with each of the two forced;
- ``fbgemm float attention``: ``QuantConfig(quantize_attention=False)`` (PyTorch's SDPA in f32).

``--kernel``: the attention kernel alone on head layouts of the benchmark models (median ms): the integer kernel
with its codes multiplied on ``torch._int_mm`` and on the exact f32 GEMM (``deploy.gemm_choice``; the same
numbers), vs the f32 chain vs f32 SDPA, and the GEMM the kernel measures as faster for that shape's blocks.

Usage: ``python benchmarks/integer_attention_speed.py --model {cifar10,cifar10-32heads,sd-shaped} [--rounds 5]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import (  # noqa: E402
    cifar10_ddpm_unet,
    interleaved_ratios,
    quantize_plain,
    sd_shaped_unet,
    unet_inputs,
)
from benchmarks.machine import cpu_flags  # noqa: E402
from qdiff_ao.deploy.attention_kernel import measured_int_gemm  # noqa: E402
from qdiff_ao.deploy.freezing import freeze_graph  # noqa: E402
from qdiff_ao.deploy.integer_attention import integer_attention_kernel, lower_integer_attention  # noqa: E402

MODELS = {"cifar10": lambda: cifar10_ddpm_unet(0), "cifar10-32heads": lambda: cifar10_ddpm_unet(0, heads32=True),
          "sd-shaped": lambda: sd_shaped_unet(0)}
KERNEL_SHAPES = {  # (batch, tokens, heads, head dim) of each model's largest self-attention
    "cifar10": (8, 256, 1, 256), "cifar10-32heads": (8, 256, 32, 8), "sd-shaped": (2, 1024, 8, 16)}


def model_table(name: str, rounds: int) -> None:
    unet = MODELS[name]()
    batch = 2 if name == "sd-shaped" else 4
    calib = [unet_inputs(unet, batch, t, seed=i) for i, t in enumerate((950, 700, 400, 100))]
    example = unet_inputs(unet, 1, 500, seed=3)
    rows: dict[str, Any] = {"FP32 eager": lambda x: unet(**x).sample}
    graph = quantize_plain(unet, qdiff_ao.QuantConfig(weight_bits=4, act_bits=8), calib)
    f32_chain = freeze_graph(graph, example)
    on_int_mm = freeze_graph(lower_integer_attention(graph, int_gemm=True), example)
    on_f32_gemm = freeze_graph(lower_integer_attention(graph, int_gemm=False), example)
    integer = freeze_graph(lower_integer_attention(graph), example)  # the default: measured per block shape
    float_attention = freeze_graph(
        quantize_plain(unet, qdiff_ao.QuantConfig(weight_bits=4, act_bits=8, quantize_attention=False), calib), example)
    rows["fbgemm default, f32 attention matmuls"] = lambda x: f32_chain(**x)
    rows["fbgemm default, integer attention, GEMM measured per shape (the default)"] = lambda x: integer(**x)
    rows["fbgemm default, integer attention on _int_mm"] = lambda x: on_int_mm(**x)
    rows["fbgemm default, integer attention on the exact f32 GEMM"] = lambda x: on_f32_gemm(**x)
    rows["fbgemm float attention"] = lambda x: float_attention(**x)
    with torch.no_grad():
        x = unet_inputs(unet, 2, 500, seed=5)
        a, b = f32_chain(**x), integer(**x)
        same = torch.equal(on_int_mm(**x), on_f32_gemm(**x))
        same = same and torch.equal(b, on_int_mm(**x))
    print(f"the GEMM measured per block shape here: {_frozen_choice(integer)}; integer attention on _int_mm, on the "
          f"f32 GEMM and measured bit-identical at batch 2: {same}")
    print(f"integer vs f32 attention matmuls, rel. L2 at batch 2: {float((a - b).norm() / a.norm()):.4f} "
          "(code-level differences grown through this random-weight UNet's requantizations)")
    batches = [1, 2] if name == "sd-shaped" else [1, 8]
    cells = interleaved_ratios(rows, unet, batches, rounds=rounds, iters=3)
    print(f"\n| {name} | " + " | ".join(f"b{b}" for b in batches) + " |")
    print("|---|" + "---:|" * len(batches))
    for label, values in cells.items():
        print(f"| {label} | " + " | ".join(values) + " |")


def _frozen_choice(frozen: Any) -> str:
    """Which GEMM the frozen graph's attentions run, read from its TorchScript graph (freezing folds the branch
    not taken away, so ``_int_mm`` appears where at least one attention runs on it)."""
    graph = str(frozen.graph)
    return "torch._int_mm in at least one attention" if "aten::_int_mm" in graph else "exact f32 GEMM in every one"


def _median_ms(fn: Any, n: int = 7) -> float:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def _kernel_row(shape: tuple[int, int, int, int], g: torch.Generator) -> tuple[list[float], bool]:
    """(integer kernel on torch._int_mm, on the exact f32 GEMM, f32 chain, f32 SDPA) median ms on one attention of
    ``shape`` = (B, N, heads, d), and whether the kernel's own measurement picks ``_int_mm`` for it."""
    b, n, h, d = shape

    def source(scale: float, zero: int) -> torch.Tensor:  # a projection's quantized output [B, N, heads * d]
        return torch.quantize_per_tensor(torch.randn(b, n, h * d, generator=g), scale, zero, torch.quint8)

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, n, h, d).transpose(1, 2)

    q_src, k_src, v_src = source(0.02, 120), source(0.03, 140), source(0.025, 131)
    q, k, v = heads(q_src), heads(k_src), heads(v_src)
    qf, kf, vf = q.dequantize(), k.dequantize(), v.dequantize()
    factor = d ** -0.5

    def chain() -> torch.Tensor:  # as convert_fx's graph: dequantize the projection output, then the head views
        probs = torch.softmax(torch.matmul(heads(q_src.dequantize()) * factor,
                                           heads(k_src.dequantize()).transpose(-1, -2)), -1)
        return torch.quantize_per_tensor(probs, 1 / 255, 0, torch.quint8).dequantize() @ heads(v_src.dequantize())

    with torch.no_grad():
        picks_int = measured_int_gemm(q, k.transpose(-1, -2), v)
        return [*(_median_ms(lambda gemm=int_gemm: integer_attention_kernel(q, k.transpose(-1, -2), v, factor,
                                                                            1 / 255, 0, int_gemm=gemm))
                  for int_gemm in (True, False)),
                _median_ms(chain),
                _median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(qf, kf, vf))], picks_int


def kernel_table() -> None:
    print("| model's attention (B, N, heads, d) | kernel, _int_mm (ms) | kernel, exact f32 GEMM (ms) | f32 chain (ms) "
          "| f32 SDPA (ms) | the kernel's measured pick |")
    print("|---|---:|---:|---:|---:|---|")
    g = torch.Generator().manual_seed(0)
    for name, shape in KERNEL_SHAPES.items():
        cells, picks_int = _kernel_row(shape, g)
        pick = "_int_mm" if picks_int else "f32 GEMM"
        print(f"| {name} {shape} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {pick} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="cifar10")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kernel", action="store_true", help="time the attention kernel alone instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU flags: {cpu_flags()}")
    if args.kernel:
        kernel_table()
    else:
        model_table(args.model, args.rounds)


if __name__ == "__main__":
    main()
