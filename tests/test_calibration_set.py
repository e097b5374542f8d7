"""Tests for qdiff_ao.calibration.calibration_set.CalibrationSet (grouping, subsets, safetensors) and calibrate()."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler
from safetensors.torch import save_file

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.collection import calibrate
from qdiff_ao.observers.timestep_context import current_timestep
from tests.calibration_helpers import collect, count_calls, tiny_cond_unet, tiny_unet


def small_set() -> CalibrationSet:
    t = torch.tensor([999, 499, 999, 499, 999, 1])
    ehs = torch.arange(6.0).reshape(6, 1, 1).expand(6, 2, 3).contiguous()
    return CalibrationSet(
        torch.arange(6.0).reshape(6, 1, 1, 1),
        t,
        encoder_hidden_states=ehs,
        class_labels=torch.tensor([0, 1, 2, 3, 4, 5]),
        metadata={"seed": 0},
    )


def test_batches_group_by_timestep_and_cover_every_row_once() -> None:
    calib = small_set()
    batches = list(calib.batches(2))
    assert [(t, inputs["sample"].shape[0]) for t, inputs in batches] == [(999, 2), (999, 1), (499, 2), (1, 1)]
    assert calib.num_batches(2) == 4
    for t, inputs in batches:
        assert set(inputs) == {"sample", "timestep", "encoder_hidden_states", "class_labels"}
        assert inputs["timestep"].dim() == 1 and (inputs["timestep"] == t).all()
        assert torch.equal(inputs["encoder_hidden_states"][:, 0, 0], inputs["sample"].flatten())
        assert torch.equal(inputs["class_labels"].float(), inputs["sample"].flatten())
    rows = torch.cat([inputs["sample"].flatten() for _, inputs in batches])
    assert sorted(rows.tolist()) == list(range(6))
    assert calib.timesteps() == [1, 499, 999]
    assert calib.timestep_histogram() == {1: 1, 499: 2, 999: 3}
    with pytest.raises(ValueError, match="batch_size"):
        next(calib.batches(0))


def test_example_inputs_and_subset() -> None:
    calib = small_set()
    inputs = calib.example_inputs(3)
    assert inputs["sample"].shape == (3, 1, 1, 1) and inputs["timestep"].tolist() == [999] * 3
    with pytest.raises(ValueError, match="batch_size <= 3"):
        calib.example_inputs(4)
    sub = calib.subset(timesteps=[1, 499])
    assert sub.timestep_histogram() == {1: 1, 499: 2} and sub.metadata == calib.metadata
    assert sub.sample.flatten().tolist() == [1.0, 3.0, 5.0]
    with pytest.raises(ValueError, match="not in this set"):
        calib.subset(timesteps=[7])


def test_set_checks_its_shapes() -> None:
    with pytest.raises(ValueError, match="has 2 rows but sample has 3"):
        CalibrationSet(torch.zeros(3, 1, 2, 2), torch.zeros(2))
    with pytest.raises(ValueError, match="N >= 1"):
        CalibrationSet(torch.zeros(0, 1, 2, 2), torch.zeros(0))
    with pytest.raises(TypeError, match="timestep must be a torch.Tensor"):
        CalibrationSet(torch.zeros(1, 1, 2, 2), [1])


def test_safetensors_round_trip(tmp_path) -> None:
    calib = collect(
        tiny_cond_unet(), EulerDiscreteScheduler(), encoder_hidden_states=torch.randn(2, 5, 16), guidance_scale=1.0
    )
    path = tmp_path / "calib.safetensors"
    calib.save(path)
    loaded = CalibrationSet.load(path)
    for name in ("sample", "timestep", "encoder_hidden_states", "step_index"):
        assert torch.equal(getattr(loaded, name), getattr(calib, name))
        assert getattr(loaded, name).dtype == getattr(calib, name).dtype
    assert loaded.class_labels is None
    assert loaded.metadata == calib.metadata
    assert loaded.metadata["scheduler"] == "EulerDiscreteScheduler" and loaded.metadata["seed"] == "0"


def test_load_refuses_files_that_are_not_ours(tmp_path) -> None:
    foreign = tmp_path / "weights.safetensors"
    save_file({"sample": torch.zeros(1, 1, 2, 2), "timestep": torch.zeros(1)}, str(foreign))
    with pytest.raises(ValueError, match="not a qdiff_ao calibration set"):
        CalibrationSet.load(foreign)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        CalibrationSet.load(garbage)
    with pytest.raises(FileNotFoundError):
        CalibrationSet.load(tmp_path / "missing.safetensors")


# --- calibrate --------------------------------------------------------------------------------------------------


class Recorder(torch.nn.Module):
    """Records, per call, the published timestep and the timesteps of the batch it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls: list[tuple[object, list, int]] = []

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        self.calls.append((current_timestep(), timestep.tolist(), sample.shape[0]))
        return sample * self.scale


def test_calibrate_publishes_each_batch_timestep() -> None:
    calib = collect(tiny_unet(), EulerDiscreteScheduler(), samples_per_timestep=5)
    recorder = Recorder()
    calibrate(recorder, calib, batch_size=2, progress=False)
    assert len(recorder.calls) == calib.num_batches(2) == 5 * 3
    for published, batch_t, _ in recorder.calls:
        assert batch_t == [published] * len(batch_t)
    assert Counter(t for t, _, size in recorder.calls for _ in range(size)) == calib.timestep_histogram()
    assert current_timestep() is None


def test_calibrate_accepts_graph_modules_and_unets_and_checks_inputs() -> None:
    calib = collect(tiny_unet(), DDIMScheduler(), num_timesteps=2)
    gm = torch.fx.symbolic_trace(Recorder())
    calibrate(gm, calib, batch_size=4, progress=False)
    unet = tiny_unet()
    calls = count_calls(unet)
    calibrate(unet, calib, batch_size=4, progress=False)
    assert len(calls) == calib.num_batches(4) == 2
    with_text = CalibrationSet(calib.sample, calib.timestep, encoder_hidden_states=torch.zeros(len(calib), 1, 2))
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        calibrate(gm, with_text, progress=False)
    with pytest.raises(TypeError, match="CalibrationSet"):
        calibrate(gm, {"sample": calib.sample}, progress=False)
