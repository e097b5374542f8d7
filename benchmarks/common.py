"""Shared pieces of the benchmarks: model architectures built from configs (no download)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from benchmarks.machine import cpu_flags

_CIFAR10_LAYOUT: dict[str, Any] = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)

CIFAR10_DDPM: dict[str, Any] = dict(
    **_CIFAR10_LAYOUT, attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, freq_shift=1,
    flip_sin_to_cos=False,
)
"""google/ddpm-cifar10-32's real configuration: single-head attention (its ``attention_head_dim`` is null), and
its own norm epsilon, downsample padding and time-embedding settings."""

CIFAR10_32_HEADS: dict[str, Any] = dict(_CIFAR10_LAYOUT)
"""The same layout with diffusers' defaults, i.e. ``attention_head_dim=8``: 32 heads of dimension 8 at 256
channels. Not google/ddpm-cifar10-32 (benchmarks before 2026-12-02 called it that): an attention stress case."""


def cifar10_ddpm_unet(seed: int = 0, *, heads32: bool = False) -> UNet2DModel:
    """google/ddpm-cifar10-32's configuration (35.7M parameters) with random weights; ``heads32``: the 32-head
    attention stress variant (:data:`CIFAR10_32_HEADS`)."""
    torch.manual_seed(seed)
    return UNet2DModel(**(CIFAR10_32_HEADS if heads32 else CIFAR10_DDPM)).eval()


SD_SHAPED: dict[str, Any] = dict(
    sample_size=32, in_channels=4, out_channels=4, block_out_channels=(128, 256, 256), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=8, cross_attention_dim=768,
)
"""Stable Diffusion's block layout scaled to this machine: 32x32x4 latents, 8 heads (diffusers'
``attention_head_dim`` of UNet2DConditionModel is the head count, as in SD's own config), self-attention over
1,024 tokens at the top level and cross-attention to 77 text tokens of width 768."""

TEXT_TOKENS = 77


def sd_shaped_unet(seed: int = 0) -> UNet2DConditionModel:
    """:data:`SD_SHAPED` with random weights."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(**SD_SHAPED).eval()


def bundled_unet() -> UNet2DModel | None:
    """The project's trained digits DDPM, if its weights are in the package."""
    from qdiff_ao.app.bundled import DIGITS_DDPM_DIR

    path = os.path.join(DIGITS_DDPM_DIR, "unet")
    if not os.path.isdir(path):
        return None
    return UNet2DModel.from_pretrained(path).eval()


def unet_inputs(unet: torch.nn.Module, batch: int, t: int, seed: int) -> dict[str, torch.Tensor]:
    """Seeded UNet inputs: ``sample`` [batch, C, S, S] ~ N(0, I), ``timestep`` = t for every row and, for a
    UNet2DConditionModel, ``encoder_hidden_states`` [batch, 77, D] ~ N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    inputs = {"sample": torch.randn(batch, c, s, s, generator=g), "timestep": torch.full((batch,), t)}
    if isinstance(unet, UNet2DConditionModel):
        inputs["encoder_hidden_states"] = torch.randn(batch, TEXT_TOKENS, unet.config.cross_attention_dim, generator=g)
    return inputs


def time_once(fn: Callable[[], object], iters: int) -> float:
    """Median wall time of ``iters`` calls of ``fn`` (seconds)."""
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def interleaved_ratios(
    variants: dict[str, Callable[[dict[str, torch.Tensor]], object]], unet: torch.nn.Module, batches: list[int],
    rounds: int, iters: int, baseline: str = "FP32 eager",
) -> dict[str, list[str]]:
    """Table cells "ratio (ms)" per variant and batch: median over rounds of baseline_time / variant_time.

    Every round times the baseline, then each variant back to back (median of ``iters`` forwards), so the
    ratio of one round cancels most of this noisy machine's drift.
    """
    cells: dict[str, list[str]] = {v: [] for v in variants}
    for b in batches:
        x = unet_inputs(unet, b, 500, seed=99)
        ratios: dict[str, list[float]] = {v: [] for v in variants}
        times: dict[str, list[float]] = {v: [] for v in variants}
        with torch.no_grad():
            for fn in variants.values():
                fn(x)  # warm-up (weight packing, allocator, ORT sessions)
            for _ in range(rounds):
                ref = time_once(lambda x=x: variants[baseline](x), iters)
                for v, fn in variants.items():
                    tv = ref if v == baseline else time_once(lambda fn=fn, x=x: fn(x), iters)
                    ratios[v].append(ref / tv)
                    times[v].append(tv)
        for v in variants:
            cells[v].append(f"{statistics.median(ratios[v]):.2f}x ({1e3 * statistics.median(times[v]):.1f})")
    return cells


def quantize_plain(unet: torch.nn.Module, cfg: Any, batches: list[dict[str, torch.Tensor]]) -> torch.fx.GraphModule:
    """qdiff_ao.prepare -> run every batch (plain calibration) -> Q/K/V grids (for ``attention_symmetric="measured"``)
    -> qdiff_ao.convert."""
    import qdiff_ao

    prepared = qdiff_ao.prepare(unet, cfg, batches[0])
    with torch.no_grad():
        for batch in batches:
            prepared(**batch)
    if cfg.attention_symmetric == "measured" and cfg.act_bits is not None:
        qdiff_ao.passes.choose_attention_grids(prepared)
    return qdiff_ao.convert(prepared)


def ort_runner(path: Any, threads: int) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """An ONNX Runtime CPU session on ``path`` as a function of the input dict, with ``threads`` intra-op threads and
    ``session.intra_op.allow_spinning = 0`` (spinning threads would steal the cores the next timed row runs on)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {k: v.numpy() for k, v in x.items()})[0])


def pass_benchmark_parser(description: str | None) -> argparse.ArgumentParser:
    """Options of the benchmarks that time a pass on a freshly collected calibration set: ``--threads``,
    ``--timesteps`` x ``--samples`` calibration rows (100 sampler steps) and ``--repeats``."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timesteps", type=int, default=20)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    return ap


def use_threads(threads: int) -> None:
    """Set torch's CPU threads and print the machine line every timing table starts with (flags included)."""
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"flags: {cpu_flags()}", flush=True)
