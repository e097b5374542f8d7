"""Copying calibrated observer statistics to a graph prepared again (``calibration.observer_transfer``): the copy must
equal what a calibration pass gives, bit for bit, and anything that cannot be matched must be refused whole."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx, nn

import qdiff_ao
from qdiff_ao.calibration.observer_transfer import transfer_observer_statistics
from tests.calibration_helpers import tiny_cond_unet
from tests.quality_fixtures import build_unet, late_step_calib


def _cond_calib(rows: int = 4) -> qdiff_ao.CalibrationSet:
    g = torch.Generator().manual_seed(5)
    sample = torch.cat([torch.randn(rows, 4, 8, 8, generator=g) * 3, torch.randn(rows, 4, 8, 8, generator=g) * 0.1])
    t = torch.cat([torch.full((rows,), 800), torch.full((rows,), 20)])
    return qdiff_ao.CalibrationSet(sample, t, encoder_hidden_states=torch.randn(2 * rows, 5, 16, generator=g))


_CASES = {"uncond": (build_unet, late_step_calib), "cond": (tiny_cond_unet, _cond_calib)}
_PREPARED: dict[tuple[str, int], tuple[nn.Module, qdiff_ao.CalibrationSet, qdiff_ao.QuantConfig, fx.GraphModule]] = {}


def _calibrated(case: str, weight_bits: int) -> tuple[nn.Module, qdiff_ao.CalibrationSet, qdiff_ao.QuantConfig,
                                                      fx.GraphModule]:
    if (case, weight_bits) not in _PREPARED:
        build, make_calib = _CASES[case]
        unet, calib = build(), make_calib()
        cfg = qdiff_ao.QuantConfig(weight_bits=weight_bits, act_bits=8)
        prepared = qdiff_ao.prepare(unet, cfg, calib.example_inputs(1))
        qdiff_ao.calibrate(prepared, calib, progress=False)
        _PREPARED[(case, weight_bits)] = unet, calib, cfg, prepared
    return _PREPARED[(case, weight_bits)]


def _layers(prepared: fx.GraphModule) -> list[str]:
    return [n for n, m in prepared.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _assert_same_state(sa: dict[str, torch.Tensor], sb: dict[str, torch.Tensor]) -> None:
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ: {different[:5]}"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(sorted(_CASES)), weight_bits=st.sampled_from([4, 8]), data=st.data())
def test_copied_statistics_equal_a_calibration_pass(case: str, weight_bits: int, data: st.DataObject) -> None:
    """Any set of layers kept float (the fallback's only change between preparations): the copied observers give
    the same state dict as calibrating the new graph on the same set."""
    unet, calib, cfg, prepared = _calibrated(case, weight_bits)
    keep = data.draw(st.lists(st.sampled_from(_layers(prepared)), unique=True, max_size=6), label="keep_float")
    cfg2 = dataclasses.replace(cfg, keep_float=tuple(keep))
    copied = qdiff_ao.prepare(unet, cfg2, calib.example_inputs(1))
    calibrated = qdiff_ao.prepare(unet, cfg2, calib.example_inputs(1))
    assert transfer_observer_statistics(prepared, copied) == []
    qdiff_ao.calibrate(calibrated, calib, progress=False)
    _assert_same_state(copied.state_dict(), calibrated.state_dict())  # qparams are computed from this state alone


def test_observers_are_copies_not_shared_with_the_source() -> None:
    unet, calib, cfg, prepared = _calibrated("uncond", 8)
    target = qdiff_ao.prepare(unet, dataclasses.replace(cfg, keep_float=("conv_in",)), calib.example_inputs(1))
    assert transfer_observer_statistics(prepared, target) == []
    source_ids = {id(m) for m in prepared.modules()}
    observers = [m for m in target.modules() if isinstance(m, qdiff_ao.observers.TimestepAwareObserver)]
    assert observers and not any(id(m) in source_ids for m in observers)


def test_another_activation_config_is_refused_whole() -> None:
    """6-bit activations observe the same values but must not get the 8-bit statistics: every activation observer
    is reported (the softmax observer, 8-bit either way, matches) and the target keeps its fresh (empty) observers."""
    unet, calib, cfg, prepared = _calibrated("uncond", 8)
    target = qdiff_ao.prepare(unet, dataclasses.replace(cfg, act_bits=6), calib.example_inputs(1))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    unmatched = transfer_observer_statistics(prepared, target)
    observers = {n for n, m in target.named_modules() if isinstance(m, qdiff_ao.observers.TimestepAwareObserver)
                 and "softmax" not in n}
    assert set(unmatched) >= observers and observers
    _assert_same_state(target.state_dict(), before)


def test_one_changed_observer_blocks_the_whole_copy() -> None:
    unet, calib, cfg, _ = _calibrated("uncond", 8)
    source = qdiff_ao.prepare(unet, cfg, calib.example_inputs(1))
    qdiff_ao.calibrate(source, calib, progress=False)
    name, changed = next((n, m) for n, m in source.named_modules()
                         if isinstance(m, qdiff_ao.observers.TimestepAwareObserver))
    changed.base.p = 3.0  # its range search would differ: its statistics are not the target's
    target = qdiff_ao.prepare(unet, cfg, calib.example_inputs(1))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    assert transfer_observer_statistics(source, target) == [name]
    _assert_same_state(target.state_dict(), before)


def test_a_training_mode_graph_with_running_statistics_is_refused() -> None:
    """A BatchNorm in training mode would update its running statistics during calibration; a copy of the observers
    alone would leave them untouched, so the transfer must refuse."""
    unet, calib, cfg, prepared = _calibrated("uncond", 8)
    target = qdiff_ao.prepare(unet, cfg, calib.example_inputs(1))
    target.add_module("running_stats", nn.BatchNorm2d(3).train())
    assert transfer_observer_statistics(prepared, target)


def test_quantize_fallback_rounds_copy_instead_of_calibrating(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default recipe's fallback rounds keep layers in float and reuse the statistics: one calibration pass in
    all (before the first round), and the report says no round recalibrated."""
    from diffusers import DDIMScheduler

    import qdiff_ao.calibration.collection as collection

    passes: list[int] = []
    real = collection.calibrate

    def counting(*args: object, **kwargs: object) -> None:
        passes.append(1)
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("qdiff_ao.workflow.calibrate", counting)
    monkeypatch.setattr("qdiff_ao.passes.fallback_rounds.calibrate", counting)
    qunet = qdiff_ao.quantize(build_unet(), DDIMScheduler(), qdiff_ao.QuantConfig(weight_bits=8),
                              calib=late_step_calib(rows=4), reconstruct=False, batch_size=8, progress=False)
    fallback = qunet.quantization_info["precision_fallback"]
    assert fallback["rounds"] >= 2 and fallback["layers"]  # at least one round kept layers and prepared again
    assert fallback["recalibrations"] == 0 and len(passes) == 1

