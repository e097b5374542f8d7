"""The property-test kit catches planted bugs, passes torch.ao's own observers, and reports what it ran."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import Phase, find
from hypothesis import settings as hyp_settings
from torch.ao.quantization import MovingAverageMinMaxObserver

from qdiff_ao._compat import MinMaxObserver, ObserverBase, PerChannelMinMaxObserver
from qdiff_ao.primitives import check_finite, choose_qparams, fake_quant
from qdiff_ao.testing import (
    FAKE_QUANT_PROPERTIES,
    OBSERVER_PROPERTIES,
    PropertyViolation,
    check_fake_quant,
    check_observer,
    examples_run,
    observer_properties,
)
from qdiff_ao.testing.strategies import float_tensors, timestep_batches

REPO = Path(__file__).resolve().parents[1]
N = 25  # examples per property: enough for every planted bug under the derandomized CI profile
TORCH_NAN = {"non_finite": "torch.ao's observers accept NaN/Inf silently (no input check)"}


class PlantedObserver(ObserverBase):
    """Correct per-tensor running min/max observer (the control); subclasses below plant one bug each."""

    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(
        self,
        dtype: torch.dtype = torch.quint8,
        qscheme: torch.qscheme = torch.per_tensor_affine,
        quant_min: int = 0,
        quant_max: int = 255,
    ) -> None:
        super().__init__(dtype=dtype)
        self.qscheme, self.quant_min, self.quant_max = qscheme, quant_min, quant_max
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        check_finite(x, type(self).__name__)
        lo, hi = torch.aminmax(x.detach())
        self.min_val, self.max_val = torch.minimum(self.min_val, lo), torch.maximum(self.max_val, hi)
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return choose_qparams(
            self.min_val,
            self.max_val,
            self.quant_min,
            self.quant_max,
            symmetric=self.qscheme == torch.per_tensor_symmetric,
        )

    def reset_min_max_vals(self) -> None:
        self.min_val, self.max_val = torch.tensor(float("inf")), torch.tensor(float("-inf"))


class OffByOneObserver(PlantedObserver):
    """(a) Computes qparams for [quant_min, quant_max + 1]: the observed maximum gets code quant_max + 1."""

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale, zp = choose_qparams(
            self.min_val,
            self.max_val,
            self.quant_min,
            self.quant_max + 1,
            symmetric=self.qscheme == torch.per_tensor_symmetric,
        )
        return scale, zp.clamp(self.quant_min, self.quant_max)


class ZeroScaleObserver(PlantedObserver):
    """(b) scale = (max - min) / (quant_max - quant_min) with no eps and no widening to 0: 0 on constant input."""

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = (self.max_val - self.min_val) / (self.quant_max - self.quant_min)
        return scale, self.quant_min - torch.round(self.min_val / scale)


class ForgetfulObserver(PlantedObserver):
    """(c) Keeps its running min/max in plain attributes instead of buffers, so state_dict() does not carry them."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        del self.min_val, self.max_val  # drop the buffers ...
        self.min_val, self.max_val = torch.tensor(float("inf")), torch.tensor(float("-inf"))  # ... plain attributes


def _bcast(p: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if ch_axis is None:
        return p
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return p.reshape(shape)


def round_half_up_wrong(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """(d) 'round half up' written as round(x/s + 0.5): odd grid points move up one step on every call."""
    s, z = _bcast(scale.float(), x, ch_axis), _bcast(zero_point.float(), x, ch_axis)
    q = torch.clamp(torch.round(x / s + 0.5) + z, quant_min, quant_max)
    return (q - z) * s


def floor_plus_06(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """floor(x/s + 0.6): idempotent on the grid, but up to 0.6 steps of error."""
    s, z = _bcast(scale.float(), x, ch_axis), _bcast(zero_point.float(), x, ch_axis)
    q = torch.clamp(torch.floor(x / s + 0.6) + z, quant_min, quant_max)
    return (q - z) * s


def torch_fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """torch's own fake-quant kernels behind the kit's calling convention."""
    if ch_axis is None:
        return torch.fake_quantize_per_tensor_affine(x, float(scale), int(zero_point), quant_min, quant_max)
    return torch.fake_quantize_per_channel_affine(x, scale.float(), zero_point.int(), ch_axis, quant_min, quant_max)


@pytest.mark.parametrize("factory", [MinMaxObserver, PerChannelMinMaxObserver], ids=lambda f: f.__name__)
def test_torch_observers_pass_with_nan_check_skipped(factory: Any) -> None:
    report = check_observer(factory, skip=TORCH_NAN, max_examples=N, fx_max_examples=4)
    assert report.ran == [p for p in OBSERVER_PROPERTIES if p != "non_finite"]
    assert report.skipped == TORCH_NAN
    assert report.examples["qparams"] >= N and report.examples["fx"] >= 4
    assert not report.violations


def test_control_observer_passes_everything() -> None:
    report = check_observer(PlantedObserver, per_channel=False, max_examples=N, fx_max_examples=3)
    assert report.ran == list(OBSERVER_PROPERTIES) and report.skipped == {}


@pytest.mark.parametrize(
    ("observer", "expected"),
    [(OffByOneObserver, "range"), (ZeroScaleObserver, "qparams"), (ForgetfulObserver, "state_dict")],
    ids=["off_by_one_quant_max", "zero_scale_on_constant_input", "state_dict_forgets_statistics"],
)
def test_planted_observer_bugs_are_caught(observer: type, expected: str) -> None:
    with pytest.raises(PropertyViolation) as info:
        check_observer(observer, per_channel=False, max_examples=N, skip={"fx": "slow; covered elsewhere"})
    assert info.value.property == expected
    assert isinstance(info.value, AssertionError)
    message = str(info.value)
    assert f"property {expected!r}" in message and "minimal counterexample" in message
    assert "bits=" in message and "shape (" in message and "calibration batch" in message


def test_off_by_one_message_shows_the_offending_code() -> None:
    with pytest.raises(PropertyViolation) as info:
        check_observer(OffByOneObserver, per_channel=False, max_examples=N, properties=["range"])
    assert info.value.properties == ("range",)
    message = str(info.value)
    assert "more than half a step outside [quant_min, quant_max]" in message
    assert "scale=" in message and "zero_point=" in message


def test_order_dependent_observer_caught_unless_declared() -> None:
    with pytest.raises(PropertyViolation) as info:
        check_observer(MovingAverageMinMaxObserver, properties=["order_invariance"], max_examples=N)
    assert info.value.properties == ("order_invariance",)
    report = check_observer(
        MovingAverageMinMaxObserver,
        order_invariant=False,
        clips=True,
        skip=TORCH_NAN,
        max_examples=N,
        properties=["order_invariance", "state_dict", "range"],
    )
    assert report.ran == ["range", "state_dict"]
    assert "order_invariant=False" in report.skipped["order_invariance"]


def test_non_idempotent_fake_quant_is_caught() -> None:
    with pytest.raises(PropertyViolation) as info:
        check_fake_quant(round_half_up_wrong, max_examples=N)
    assert "idempotence" in info.value.properties
    assert "fq(fq(x))=" in str(info.value)
    no_shrink = hyp_settings(max_examples=N, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # just the verdict
    with pytest.raises(PropertyViolation) as info:
        check_fake_quant(floor_plus_06, settings=no_shrink)
    assert info.value.properties == ("round_trip",)


@pytest.mark.parametrize("fn", [fake_quant, torch_fake_quant], ids=["primitives", "torch"])
def test_correct_fake_quants_pass(fn: Any) -> None:
    report = check_fake_quant(fn, max_examples=N)
    assert report.ran == list(FAKE_QUANT_PROPERTIES)
    assert report.total_examples >= N * len(FAKE_QUANT_PROPERTIES)


def test_bad_arguments_are_value_errors() -> None:
    with pytest.raises(ValueError, match="unknown property 'roundtrip'"):
        check_observer(MinMaxObserver, skip={"roundtrip": "typo"})
    with pytest.raises(ValueError, match="needs a reason"):
        check_observer(MinMaxObserver, skip={"non_finite": ""})
    with pytest.raises(ValueError, match="unknown property"):
        check_fake_quant(fake_quant, properties=["state_dict"])


def test_examples_are_counted() -> None:
    before = examples_run()
    report = check_fake_quant(fake_quant, properties=["zero"], settings=hyp_settings(max_examples=7, database=None))
    assert report.examples == {"zero": 7}
    assert examples_run() - before == 7


def test_strategies_reach_the_hard_values() -> None:
    tiny = float(np.finfo(np.float32).tiny)
    sub = find(float_tensors(kinds=["subnormal"]), lambda x: bool(((x != 0) & (x.abs() < tiny)).any()))
    assert bool((sub.abs() < tiny).all())
    out = find(float_tensors(kinds=["outlier"], max_abs=100.0), lambda x: x.numel() >= 4)
    assert int((out.abs() >= 50).sum()) == 1
    const = find(float_tensors(kinds=["constant"]), lambda x: x.numel() >= 2 and bool(x[0] != 0))
    assert bool((const == const.reshape(-1)[0]).all())
    steps = find(timestep_batches(min_batches=3), lambda b: len({t for t, _ in b}) >= 2)
    assert len(steps) >= 3 and all(0 <= t < 1000 and x.shape == steps[0][1].shape for t, x in steps)


def test_observer_properties_makes_one_pytest_test_per_property() -> None:
    test = observer_properties(MinMaxObserver, max_examples=5, skip=TORCH_NAN)
    (mark,) = [m for m in test.pytestmark if m.name == "parametrize"]
    assert mark.args == ("qdiff_property", list(OBSERVER_PROPERTIES))
    test("zero")
    with pytest.raises(pytest.skip.Exception, match="accept NaN"):
        test("non_finite")
    with pytest.raises(PropertyViolation):
        observer_properties(OffByOneObserver, per_channel=False, max_examples=N)("range")
    with pytest.raises(ValueError, match="unknown property"):
        observer_properties(MinMaxObserver, skip={"nan": "typo"})


@pytest.mark.slow
def test_three_line_pytest_file(tmp_path: Path) -> None:
    """A user's three-line test file collects one test per property, with the plugin's example count."""
    (tmp_path / "test_user_observer.py").write_text(
        textwrap.dedent("""
        from torch.ao.quantization import MinMaxObserver
        from qdiff_ao.testing import observer_properties
        test_minmax = observer_properties(MinMaxObserver, max_examples=5, skip={"non_finite": "torch accepts NaN"})
    """)
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rs",
        "-p",
        "qdiff_ao.testing.pytest_plugin",
        "-p",
        "no:cacheprovider",
    ]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "test_user_observer.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "10 passed, 1 skipped" in proc.stdout
    assert "torch accepts NaN" in proc.stdout and "property-test examples ran" in proc.stdout


def test_custom_percentile_example_runs() -> None:
    """The example registers its observer, passes the kit and quantizes a tiny model (error < 10%)."""
    import runpy

    from qdiff_ao import get_observer

    example = runpy.run_path(str(REPO / "examples" / "custom_percentile_observer.py"))
    example["main"](["--max-examples", "5", "--batches", "2"])
    assert get_observer("percentile").__name__ == "PercentileObserver"
