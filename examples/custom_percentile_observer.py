"""Write your own observer, property-test it with ``qdiff_ao.testing``, and use it in prepare_fx / convert_fx.

The observer clips each calibration batch to its [100 - p, p] percentile range and keeps the running extremes
of those clipped ranges (so one outlier pixel cannot stretch the 8-bit grid):

    lo = min over batches of quantile(x, 1 - p/100),   hi = max over batches of quantile(x, p/100)
    scale, zero_point = choose_qparams(lo, hi, quant_min, quant_max)

Steps: subclass ``QuantRangeObserver`` (a torch.ao ``ObserverBase`` that validates dtype / qscheme / range,
skips empty input and rejects NaN/Inf), keep the statistics in buffers, register the class under a name, run
the kit's property suite on it, then select it by name in ``QuantConfig(act_observer=...)``.

Run:  python examples/custom_percentile_observer.py --percentile 99.9 --max-examples 30
"""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any

import torch
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from qdiff_ao import QuantConfig, get_backend_config, get_qconfig_mapping, register_observer
from qdiff_ao.observers import QuantRangeObserver, list_observers
from qdiff_ao.testing import check_observer

logger = logging.getLogger("custom_percentile_observer")


class PercentileObserver(QuantRangeObserver):
    """Per-tensor range from the [100 - p, p] percentiles of each batch (running min / max over batches).

    Args:
        percentile: p in (50, 100]; 100 is plain min/max.
        **kwargs: dtype, qscheme, quant_min, quant_max, as for any torch.ao observer.
    """

    lo: torch.Tensor
    hi: torch.Tensor

    def __init__(self, percentile: float = 99.9, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {percentile}; e.g. 99.9 clips 0.1% per side")
        self.percentile = float(percentile)
        # Buffers, not attributes: state_dict() must carry the statistics (the kit's state_dict property).
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))

    def _observe(self, x: torch.Tensor) -> None:
        q = torch.tensor([1.0 - self.percentile / 100.0, self.percentile / 100.0], dtype=torch.float64)
        lo, hi = torch.quantile(x.reshape(-1).double(), q).float()
        self.lo = torch.minimum(self.lo, lo)
        self.hi = torch.maximum(self.hi, hi)

    def _min_max(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lo, self.hi

    def reset_min_max_vals(self) -> None:
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))

    def extra_repr(self) -> str:
        return f"percentile={self.percentile}, " + super().extra_repr()


def register(name: str = "percentile") -> None:
    """Register ``PercentileObserver`` under ``name`` (once per process)."""
    if name not in list_observers():
        register_observer(name)(PercentileObserver)


def property_test(percentile: float, max_examples: int) -> None:
    """Run the kit's observer properties; raises PropertyViolation with a minimal counterexample on a bug."""

    def factory(**kwargs: Any) -> PercentileObserver:
        return PercentileObserver(percentile=percentile, **kwargs)

    report = check_observer(
        factory,
        per_channel=False,
        clips=True,  # percentile clipping cuts off observed values by design
        max_examples=max_examples,
        name=f"PercentileObserver(percentile={percentile})",
    )
    logger.info("%s", report.summary())


class TinyNet(nn.Module):
    """x (N, 3, 8, 8) -> conv 3x3 (3 -> 8) -> SiLU -> conv 3x3 (8 -> 4) -> y (N, 4, 4, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


def quantize_tiny_model(name: str, batches: int, seed: int) -> float:
    """W8A8 with the registered observer on activations; returns the relative error of the converted model."""
    torch.manual_seed(seed)
    model = TinyNet().eval()
    data = [torch.randn(4, 3, 8, 8) for _ in range(batches)]
    data[0][0, 0, 0, 0] = 60.0  # one outlier: min/max would spend most of the grid on it
    cfg = QuantConfig(weight_bits=8, act_bits=8, act_observer=name, timestep_aware=False, quantize_attention=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*deprecat.*")
        prepared = prepare_fx(model, get_qconfig_mapping(cfg), (data[0],), backend_config=get_backend_config(cfg))
        used = [m for m in prepared.modules() if isinstance(m, PercentileObserver)]
        logger.info("prepare_fx inserted %d %s activation observers", len(used), name)
        with torch.no_grad():
            for x in data:
                prepared(x)
        for obs in used:
            scale, zero_point = obs.calculate_qparams()
            logger.info("  range [%.4f, %.4f] -> scale %.5f, zero_point %d", obs.lo, obs.hi, scale, zero_point)
        quantized = convert_fx(prepared, backend_config=get_backend_config(cfg))
    test = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        ref, out = model(test), quantized(test)
    rel = float((out - ref).norm() / ref.norm())
    logger.info("converted model: relative error %.4f on fresh data", rel)
    return rel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--percentile", type=float, default=99.9, help="p of the [100 - p, p] clipping range")
    parser.add_argument("--max-examples", type=int, default=30, help="hypothesis examples per property")
    parser.add_argument("--batches", type=int, default=8, help="calibration batches for the tiny model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    register()
    property_test(args.percentile, args.max_examples)
    rel = quantize_tiny_model("percentile", args.batches, args.seed)
    if not rel < 0.1:
        raise SystemExit(f"relative error {rel:.3f} of the W8A8 model is unexpectedly large")


if __name__ == "__main__":
    main()
