"""The collector records the float UNet's outputs; passes read them (after a check) instead of running the model."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler

import qdiff_ao
from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.float_reference import CHECK_ROWS, FloatReference
from qdiff_ao.passes.output_correction import correct_output
from qdiff_ao.quantizers.simulation import build_simulation
from tests.calibration_helpers import collect, count_calls, tiny_cond_unet, tiny_unet


def _without_outputs(calib: CalibrationSet) -> CalibrationSet:
    tensors = {k: v for k, v in calib._tensors().items() if k != "float_output"}
    return CalibrationSet(metadata=calib.metadata, **tensors)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


@pytest.mark.parametrize("guided", [False, True])
def test_recorded_outputs_are_the_unets_own_on_each_row(guided: bool) -> None:
    if guided:
        unet = tiny_cond_unet()
        cond = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
        calib = collect(unet, DDIMScheduler(), encoder_hidden_states=cond, negative_encoder_hidden_states=torch.zeros(
            1, 5, 16), guidance_scale=5.0, num_timesteps=3, samples_per_timestep=3)
    else:
        unet = tiny_unet()
        calib = collect(unet, DDIMScheduler())
    assert calib.float_output is not None and calib.float_output.shape == (len(calib), *calib.sample.shape[1:])
    with torch.no_grad():
        for row in range(len(calib)):  # one row at a time: every row holds its own output, in stored order
            index = torch.tensor([row])
            assert _rel(calib.float_output[index], unet(**calib._rows(index)).sample) < 1e-5
    # the last selected step is recorded too (the collector runs one more forward there), and inputs stay inputs
    last = calib.timesteps()[0]
    assert bool(calib.float_output[calib.timestep == last].abs().sum() > 0)
    assert all("float_output" not in inputs for _, inputs in calib.batches(4))


def test_recording_can_be_turned_off_and_yields_to_the_memory_limit(caplog: pytest.LogCaptureFixture) -> None:
    unet = tiny_unet()
    inputs_only = collect(unet, DDIMScheduler(), record_float_output=False)
    assert inputs_only.float_output is None
    full = collect(unet, DDIMScheduler())
    assert full.nbytes == inputs_only.nbytes + len(full) * 3 * 8 * 8 * 4
    with caplog.at_level(logging.WARNING):
        tight = collect(unet, DDIMScheduler(), max_memory_bytes=inputs_only.nbytes)
    assert tight.float_output is None and "max_memory_bytes" in caplog.text
    assert torch.equal(tight.sample, full.sample)


def test_float_outputs_round_trip_and_follow_subsets(tmp_path: Path) -> None:
    calib = collect(tiny_unet(), DDIMScheduler())
    calib.save(tmp_path / "calib.safetensors")
    loaded = CalibrationSet.load(tmp_path / "calib.safetensors")
    assert loaded.float_output is not None and torch.equal(loaded.float_output, calib.float_output)
    t = calib.timesteps()[1]
    part = calib.subset([t])
    assert part.float_output is not None
    assert torch.equal(part.float_output, calib.float_output[calib.timestep == t])
    bad = calib.float_output.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="float_output.*NaN"):
        CalibrationSet(calib.sample, calib.timestep, float_output=bad)
    with pytest.raises(ValueError, match="float_output.*not floating point"):
        CalibrationSet(calib.sample, calib.timestep, float_output=torch.zeros(len(calib), 3, dtype=torch.int64))


def test_reference_reads_recorded_outputs_only_when_the_model_reproduces_them(
        caplog: pytest.LogCaptureFixture) -> None:
    unet = tiny_unet()
    calib = collect(unet, DDIMScheduler())
    runs: list[int] = []

    def forward_of(model: torch.nn.Module) -> Any:
        def forward(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            runs.append(inputs["sample"].shape[0])
            return model(**inputs).sample
        return forward

    index = torch.arange(len(calib))
    with torch.no_grad():
        same = FloatReference(calib, forward_of(unet), what="test")
        assert same.recorded and sum(runs) == CHECK_ROWS  # the check, nothing else
        assert torch.equal(same(index, calib._rows(index)), calib.float_output)
        other = copy.deepcopy(unet)
        other.conv_out.bias.data += 0.05  # another model (e.g. fine-tuned after the set was collected)
        runs.clear()
        with caplog.at_level(logging.WARNING):
            stale = FloatReference(calib, forward_of(other), what="test")
        assert not stale.recorded and "another model" in caplog.text
        expected = other(**calib._rows(index)).sample
        assert torch.equal(stale(index, calib._rows(index)), expected)
        bare = FloatReference(_without_outputs(calib), forward_of(unet), what="test")
        assert not bare.recorded


def test_output_correction_fits_the_same_with_recorded_outputs_and_skips_the_float_model() -> None:
    """The output correction decides the same on the collected set with and without its recorded outputs; with them
    the float UNet runs only the check rows."""
    unet = tiny_unet()
    calib = collect(unet, DDIMScheduler(), samples_per_timestep=4, num_timesteps=4)
    prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(weight_bits=4, act_bits=8), calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    reports: dict[str, Any] = {}
    for name, c in (("recorded", calib), ("run", _without_outputs(calib))):
        graph = copy.deepcopy(prepared)
        calls = count_calls(unet)
        correct_output(graph, c, unet, num_groups=2, batch_size=4)
        reports[name] = (qdiff_ao.graph_info(graph).bias_correction, len(calls))
    (recorded, calls_r), (run, calls_f) = reports["recorded"], reports["run"]
    assert calls_r == CHECK_ROWS and calls_f == len(calib) // 4  # only the check rows; else a batch per timestep
    assert [g["kind"] for g in recorded["groups"]] == [g["kind"] for g in run["groups"]]
    for a, b in zip(recorded["groups"], run["groups"], strict=True):
        assert a["mse_before"] == pytest.approx(b["mse_before"], rel=1e-4)
        assert a["mean_abs_offset"] == pytest.approx(b["mean_abs_offset"], rel=1e-3, abs=1e-7)


def test_float_reference_refuses_recorded_outputs_after_reconstruction() -> None:
    """After reconstruction the simulation's full-precision graph runs the rounded weights, so the timestep groups'
    reference is not the float model and the recorded outputs must not stand in for it: the check refuses them."""
    unet = tiny_unet()
    calib = collect(unet, DDIMScheduler(), samples_per_timestep=4, num_timesteps=4)
    prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(weight_bits=4, act_bits=8), calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, progress=False)
    qdiff_ao.passes.reconstruct(prepared, calib, qdiff_ao.ReconstructionConfig(weight_iters=4, act_iters=2,
                                batch_size=4), model=unet, progress=False)
    sim = build_simulation(prepared)

    def float_activations(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        with sim.full_precision():
            return sim.run(inputs)

    with torch.no_grad():
        assert not FloatReference(calib, float_activations, what="test").recorded
