"""Speed of lowered UNets vs FP32 eager, measured in one process with interleaved rounds.

    python benchmarks/speed.py [--rounds 7] [--batches 1 8] [--model cifar10|cifar10-32heads|bundled|both]
    python benchmarks/speed.py --model sd-shaped --batches 1 2

For each batch size, every round times each variant (median of --iters forward passes) back to back, and the
table reports the median over rounds of the per-round ratio FP32_time / variant_time (this machine is noisy;
ratios taken within a round cancel most of the drift). Variants: FP32 eager (the diffusers UNet), the FP32 UNet
as a frozen TorchScript module (context only: what removing Python dispatch alone gives), torch.ao's default x86
lowering of the same traced graph (HistogramObserver / per-channel MinMax, the baseline), and qdiff_ao's W8A8 and
W4A8 lowerings (split shortcuts, Lp observers), each as the converted GraphModule and frozen
(``QuantizedUNet.optimize_for_inference``). Also prints the quantize / dequantize calls per forward of each
lowered graph and the top operators of our W4A8 graph from torch.profiler.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import fx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import (  # noqa: E402
    bundled_unet,
    cifar10_ddpm_unet,
    interleaved_ratios,
    quantize_plain,
    sd_shaped_unet,
    unet_inputs,
)
from qdiff_ao._compat import convert_fx, get_default_qconfig_mapping, prepare_fx  # noqa: E402
from qdiff_ao.deploy.freezing import freeze_graph  # noqa: E402


def torch_default_x86(unet: torch.nn.Module, calib: list[dict[str, torch.Tensor]]) -> fx.GraphModule:
    """torch.ao's default x86 mapping on our traced graph; integer (timestep) nodes left unquantized."""
    gm = qdiff_ao.trace(unet, calib[0])
    mapping = get_default_qconfig_mapping("x86")
    counters: dict[object, int] = {}
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            k = counters.get(node.target, 0)
            counters[node.target] = k + 1
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "dtype") and not meta.dtype.is_floating_point:
                mapping.set_module_name_object_type_order("", node.target, k, None)
    prepared = prepare_fx(gm, mapping, tuple(calib[0].values()))
    with torch.no_grad():
        for batch in calib:
            prepared(**batch)
    return convert_fx(prepared)


def ours(unet: torch.nn.Module, calib: list[dict[str, torch.Tensor]], weight_bits: int,
         quantize_attention: bool = True) -> fx.GraphModule:
    cfg = qdiff_ao.QuantConfig(weight_bits=weight_bits, act_bits=8, quantize_attention=quantize_attention)
    return quantize_plain(unet, cfg, calib)


def count_qdq(gm: fx.GraphModule) -> tuple[int, int]:
    q = sum(1 for n in gm.graph.nodes if n.target in (torch.quantize_per_tensor, torch.quantize_per_channel))
    dq = sum(1 for n in gm.graph.nodes if n.target == "dequantize")
    return q, dq


def frozen(gm: torch.nn.Module, unet: torch.nn.Module) -> torch.nn.Module:
    """The same graph as a frozen TorchScript module (``QuantizedUNet.optimize_for_inference``'s engine)."""
    if isinstance(gm, fx.GraphModule):
        return freeze_graph(gm, unet_inputs(unet, 1, 500, seed=7))
    x = unet_inputs(unet, 1, 500, seed=7)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.freeze(torch.jit.trace(gm, example_kwarg_inputs=x, strict=False).eval())


def bench(name: str, unet: torch.nn.Module, batches: list[int], rounds: int, iters: int) -> None:
    calib = [unet_inputs(unet, 4, t, seed=i) for i, t in enumerate((950, 700, 400, 100))]
    t0 = time.perf_counter()
    graphs = {"torch.ao default x86": torch_default_x86(unet, calib)}
    for wb in (8, 4):
        graphs[f"qdiff_ao W{wb}A8"] = ours(unet, calib, wb)
    for wb in (8, 4):
        graphs[f"qdiff_ao W{wb}A8, float SDPA attention"] = ours(unet, calib, wb, quantize_attention=False)
    variants: dict[str, Callable[[dict[str, torch.Tensor]], object]] = {"FP32 eager": lambda x: unet(**x).sample}
    fp_frozen = frozen(_SampleOnly(unet), unet)
    variants["FP32 TorchScript frozen (context)"] = lambda x: fp_frozen(**x)
    for v, gm in graphs.items():
        variants[v] = lambda x, gm=gm: gm(**x)
        if v.startswith("qdiff_ao"):
            script = frozen(gm, unet)
            variants[f"{v}, frozen"] = lambda x, m=script: m(**x)
    print(f"\n## {name}: built {len(graphs)} lowered variants in {time.perf_counter() - t0:.0f} s")
    print("\n| variant | q / dq calls per forward |\n|---|---|")
    for v, gm in graphs.items():
        q, dq = count_qdq(gm)
        print(f"| {v} | {q} / {dq} |")
    print(f"\n| variant | {' | '.join(f'batch {b}: ratio vs FP32 eager (ms)' for b in batches)} |")
    print("|---|" + "---|" * len(batches))
    for v, cells in interleaved_ratios(variants, unet, batches, rounds, iters).items():
        print(f"| {v} | {' | '.join(cells)} |")
    gm = graphs["qdiff_ao W4A8, float SDPA attention"]
    x = unet_inputs(unet, batches[0], 500, seed=5)
    with torch.no_grad(), torch.profiler.profile() as prof:
        for _ in range(3):
            gm(**x)
    print(f"\nTop operators, qdiff_ao W4A8 with float SDPA attention, batch {batches[0]} (3 forwards):\n")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


class _SampleOnly(torch.nn.Module):
    """The diffusers UNet returning a plain tensor (TorchScript tracing needs tensor outputs)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is None:
            return self.unet(sample, timestep).sample
        return self.unet(sample, timestep, encoder_hidden_states).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=3, help="forwards per timing (median)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--model", choices=["cifar10", "cifar10-32heads", "sd-shaped", "bundled", "both"],
                        default="cifar10",
                        help="cifar10: google/ddpm-cifar10-32's real config (single-head attention); "
                        "cifar10-32heads: the same layout with 32 heads of dim 8 (attention stress case); "
                        "sd-shaped: Stable Diffusion's layout at 32x32 latents (benchmarks.common.SD_SHAPED; "
                        "measure it at --batches 1 2, i.e. with and without the guidance batch)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, quantized engine {torch.backends.quantized.engine}, threads {args.threads}")
    if args.model in ("cifar10", "both"):
        bench("google/ddpm-cifar10-32 configuration (random weights)", cifar10_ddpm_unet(), args.batches,
              args.rounds, args.iters)
    if args.model == "sd-shaped":
        bench("SD-shaped UNet2DConditionModel (32x32x4 latents, 8 heads, 77 text tokens; random weights)",
              sd_shaped_unet(), args.batches, args.rounds, args.iters)
    if args.model == "cifar10-32heads":
        bench("CIFAR-10 layout with 32 attention heads of dim 8 (stress case, random weights)",
              cifar10_ddpm_unet(heads32=True), args.batches, args.rounds, args.iters)
    if args.model in ("bundled", "both"):
        unet = bundled_unet()
        if unet is None:
            print("bundled model not found (train it with examples/train_ddpm.py)")
        else:
            bench("bundled digits DDPM", unet, args.batches, args.rounds, args.iters)


if __name__ == "__main__":
    main()
