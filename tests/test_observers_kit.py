"""Our own observers through the public property-test kit (qdiff_ao.testing), as a user would test theirs."""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import torch

from qdiff_ao.observers import (
    EMAMinMaxObserver,
    LpObserver,
    PerChannelLpObserver,
    RangeMinMaxObserver,
    SoftmaxObserver,
    TimestepAwareObserver,
)
from qdiff_ao.primitives import fake_quant
from qdiff_ao.testing import check_fake_quant, check_observer

# (factory, kit options, examples per property). Lp observers cost ~40 ms an example (80-candidate search).
CASES: dict[str, tuple[Any, dict[str, Any], int]] = {
    "minmax_per_tensor": (RangeMinMaxObserver, dict(per_channel=False), 60),
    "minmax_per_channel": (RangeMinMaxObserver, dict(per_channel=True), 60),
    "ema": (EMAMinMaxObserver, dict(per_channel=False, order_invariant=False, clips=True), 60),
    "timestep_minmax": (lambda **kw: TimestepAwareObserver(base=RangeMinMaxObserver(**kw)),
                        dict(per_channel=False), 60),
    "softmax": (lambda **kw: SoftmaxObserver(bits=8, **kw),
                dict(signed=False, symmetric=False, bits=(8, 8), nonnegative=True, per_channel=False), 60),
    "lp_per_tensor": (LpObserver, dict(per_channel=False, clips=True), 15),
    "lp_per_channel": (PerChannelLpObserver, dict(per_channel=True, clips=True), 15),
}


@pytest.mark.parametrize("name", list(CASES))
def test_our_observers_pass_the_kit(name: str) -> None:
    factory, options, n = CASES[name]
    report = check_observer(factory, max_examples=n, fx_max_examples=3, **options)
    assert report.total_examples > 0 and report.ran
    assert not report.skipped or all(reason for reason in report.skipped.values())


def test_our_fake_quant_passes_the_kit() -> None:
    def fq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
           ch_axis: int | None = None) -> torch.Tensor:
        return fake_quant(x, scale, zero_point, quant_min, quant_max, ch_axis)

    report = check_fake_quant(partial(fq), max_examples=150)
    assert report.total_examples > 0
