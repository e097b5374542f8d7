"""Checkpoint size: qdiff_ao compressed checkpoints vs the FP32 safetensors of the same UNet, in one run.

    python benchmarks/checkpoint_size.py                 # google/ddpm-cifar10-32 configuration, random weights
    python benchmarks/checkpoint_size.py --schemes W4A8 W8A8

For each scheme the UNet is quantized (min/max calibration on one random batch: the size does not depend on the
observer), saved with ``QuantizedUNet.save_pretrained`` and reloaded; the table gives the bytes of the checkpoint
directory (model.safetensors + config.json) over those of ``unet.save_pretrained(..., safe_serialization=True)``
and whether the reloaded model's output is bit-identical. Targets: W4 <= 0.14x, W8 <= 0.26x.

The trained digits DDPM in ``qdiff_ao/app/bundled/digits-ddpm/unet`` is measured too when it exists.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import CIFAR10_DDPM, quantize_plain  # noqa: E402

_TARGETS = {4: 0.14, 8: 0.26}
_SCHEMES = {"W4A8": (4, 8), "W8A8": (8, 8), "W4A32": (4, None), "W8A32": (8, None)}


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def measure(unet: torch.nn.Module, name: str, schemes: list[str], workdir: Path) -> list[dict[str, object]]:
    """Save ``unet`` in FP32 and each scheme; return one row per scheme."""
    fp32_dir = workdir / f"{name}-fp32"
    unet.save_pretrained(fp32_dir, safe_serialization=True)
    fp32 = _dir_bytes(fp32_dir) - (fp32_dir / "config.json").stat().st_size  # the weights file alone
    size = unet.config.sample_size
    size = size if isinstance(size, int) else size[0]
    gen = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(1, unet.config.in_channels, size, size, generator=gen),
              "timestep": torch.tensor([500])}
    rows = []
    for scheme in schemes:
        weight_bits, act_bits = _SCHEMES[scheme]
        cfg = qdiff_ao.QuantConfig(weight_bits=weight_bits, act_bits=act_bits, range_method="minmax",
                                   timestep_aware=False)
        start = time.perf_counter()
        quantized = qdiff_ao.QuantizedUNet(quantize_plain(unet, cfg, [inputs]), like=unet)
        target = quantized.save_pretrained(workdir / f"{name}-{scheme}")
        loaded = qdiff_ao.QuantizedUNet.from_pretrained(target)
        with torch.no_grad():
            identical = torch.equal(quantized(**inputs).sample, loaded(**inputs).sample)
        ours = _dir_bytes(target)
        rows.append({"model": name, "scheme": scheme, "fp32_mb": fp32 / 2**20, "ckpt_mb": ours / 2**20,
                     "ratio": ours / fp32, "target": _TARGETS[weight_bits], "identical": identical,
                     "seconds": time.perf_counter() - start})
    return rows


def _print_table(rows: list[dict[str, object]]) -> None:
    header = f"{'model':<16} {'scheme':<6} {'FP32 MiB':>9} {'ckpt MiB':>9} {'ratio':>7} {'target':>7} {'ok':>3} " \
             f"{'identical':>9} {'s':>6}"
    print(header)
    print("-" * len(header))
    for r in rows:
        ok = "yes" if float(r["ratio"]) <= float(r["target"]) else "NO"  # type: ignore[arg-type]
        print(f"{r['model']:<16} {r['scheme']:<6} {r['fp32_mb']:>9.2f} {r['ckpt_mb']:>9.2f} {r['ratio']:>7.4f} "
              f"{r['target']:>7.2f} {ok:>3} {r['identical']!s:>9} {r['seconds']:>6.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemes", nargs="+", default=["W4A8", "W8A8", "W4A32"], choices=sorted(_SCHEMES))
    parser.add_argument("--skip-cifar10", action="store_true", help="only measure the bundled digits DDPM")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from diffusers import UNet2DModel

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_cifar10:
            torch.manual_seed(0)
            rows += measure(UNet2DModel(**CIFAR10_DDPM).eval(), "ddpm-cifar10-32", args.schemes, Path(tmp))
        digits = Path(qdiff_ao.__file__).parent / "bundled" / "digits-ddpm" / "unet"
        if digits.is_dir():
            rows += measure(UNet2DModel.from_pretrained(digits).eval(), "digits-ddpm", args.schemes, Path(tmp))
        else:
            print(f"(no trained digits DDPM at {digits}; skipped)")
    _print_table(rows)


if __name__ == "__main__":
    main()
