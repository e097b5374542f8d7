"""Timestep groups (#15 item 3): per-group activation grids chosen on held-back rows, lowered as one graph per
kept group sharing the packed weights, dispatched on the timestep, saved in checkpoints (format version 2)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

import qdiff_ao
from qdiff_ao.backends import X86Backend
from qdiff_ao.deploy.checkpoint import CheckpointError
from qdiff_ao.deploy.timestep_dispatch import prepared_for_group
from qdiff_ao.quantizers.simulation import build_simulation
from qdiff_ao.quantizers.timestep_grids import contiguous_groups, group_boundaries, mapped_grid
from tests.unet_factory import build_unet, unet_inputs

FAMILY = "attn"
TIMESTEPS = (900, 700, 500, 300, 150, 50, 20, 5)


def _shrink(t: int) -> float:
    """Input amplitude at ``t``: the late steps' inputs are 20x smaller, as x_t near the data under linear betas."""
    return 0.05 + t / 900


def _inputs(batch: int, t: int, seed: int) -> dict[str, torch.Tensor]:
    x = unet_inputs(FAMILY, batch, t=t, seed=seed)
    x["sample"] = x["sample"] * _shrink(t)
    return x


@pytest.fixture(scope="module")
def grouped() -> dict[str, Any]:
    """The recipe (no reconstruction or fallback, for speed) with 4 timestep groups on a calibration set whose
    input range drifts 20x along the trajectory; the prepared graph is captured before conversion."""
    torch.manual_seed(0)
    unet = build_unet(FAMILY)
    rows = [_inputs(6, t, 100 + i) for i, t in enumerate(TIMESTEPS)]
    calib = qdiff_ao.CalibrationSet(torch.cat([r["sample"] for r in rows]), torch.cat([r["timestep"] for r in rows]))
    captured: dict[str, Any] = {}
    qunet = qdiff_ao.quantize(unet, DDIMScheduler(), qdiff_ao.QuantConfig(), calib=calib, batch_size=8,
                              progress=False, reconstruct=False, precision_fallback=False, timestep_groups=4,
                              on_prepared=lambda p, c: captured.update(prepared=copy.deepcopy(p)))
    return {"unet": unet, "calib": calib, "qunet": qunet, "prepared": captured["prepared"]}


def test_contiguous_groups_and_boundaries() -> None:
    groups = contiguous_groups([1.0, 2.0, 3.0, 4.0, 5.0], 2)
    assert groups == [[1.0, 2.0, 3.0], [4.0, 5.0]]
    assert group_boundaries(groups) == [3.5]
    assert contiguous_groups([1.0, 2.0], 5) == [[1.0], [2.0]]


@settings(max_examples=60, deadline=None)
@given(lo=st.floats(-4, -0.01), hi=st.floats(0.01, 4), clip=st.floats(0.3, 1.0), shrink=st.floats(0.05, 1.0))
def test_mapped_grid_scales_the_clipped_grid_with_the_range(lo: float, hi: float, clip: float, shrink: float) -> None:
    """The group grid is the full grid scaled by the range ratio: same clipping, the step shrinks with the range,
    and the group's own range maps onto the grid as the full range does; the full range gives the grid back."""
    grid = (lo * clip, hi * clip)
    s_full, z_full = mapped_grid(grid, (lo, hi), (lo, hi), 0, 255)
    assert s_full == pytest.approx((grid[1] - grid[0]) / 255)
    assert z_full == round(-grid[0] / s_full)
    s_g, z_g = mapped_grid(grid, (lo, hi), (lo * shrink, hi * shrink), 0, 255)
    assert s_g == pytest.approx(s_full * shrink, rel=1e-9)
    assert abs(z_g - z_full) <= 1  # same relative placement of zero, up to rounding


def test_mapped_grid_keeps_non_negative_inputs_unsigned() -> None:
    s, z = mapped_grid((0.0, 3.0), (0.0, 6.0), (0.5, 1.5), 0, 255)
    # lower end stays 0; upper end m_g + (U - m) (M_g - m_g) / (M - m) = 0.5 + 3 / 6
    assert z == 0 and s == pytest.approx(1.0 / 255)


def test_held_back_rows_decide_which_groups_keep_their_grids(grouped: dict[str, Any]) -> None:
    report = grouped["qunet"].quantization_info["timestep_groups"]
    assert len(report["groups"]) == 4
    for g in report["groups"]:
        assert g["kept"] == (g["mse_group"] < g["mse_single"])
    # the inputs of the late steps are 20x smaller: their group must profit from its own grids
    late = report["groups"][0]
    assert late["timesteps"] == [5.0, 20.0] and late["kept"] and late["mse_group"] < 0.8 * late["mse_single"]
    assert report["num_groups_kept"] == sum(g["kept"] for g in report["groups"])


def test_simulation_runs_each_row_with_its_groups_grids(grouped: dict[str, Any]) -> None:
    """Simulation.run on a mixed batch equals running each group's rows together under that group's grids (the
    same rows per forward: float kernels may round a batch differently), and a late row differs from the single
    grid."""
    prepared = grouped["prepared"]
    groups = qdiff_ao.graph_info(prepared).timestep_groups
    sim = build_simulation(prepared)
    sim.gm.eval()
    xs = [_inputs(1, t, 7) for t in TIMESTEPS]
    mixed = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    which = groups.group_of(mixed["timestep"])
    expected = torch.empty_like(mixed["sample"])
    with torch.no_grad():
        together = sim.run(mixed)
        for g in which.unique().tolist():
            idx = (which == g).nonzero().flatten()
            with sim.state.in_group(g):
                expected[idx] = sim.gm(**{k: v[idx] for k, v in mixed.items()})
        late = {k: v[-1:] for k, v in mixed.items()}
        single, own = sim.gm(**late), sim.run(late)
    assert torch.equal(together, expected)
    assert len(which.unique()) > 1 and not torch.equal(own, single)


def test_lowered_groups_equal_a_direct_conversion_of_each_group(grouped: dict[str, Any]) -> None:
    """The dispatching QuantizedUNet is bit-identical, at a timestep of each group, to convert_fx of the prepared
    graph with that group's qparams frozen in; and the group graphs share the packed weights of the base graph."""
    qunet, prepared = grouped["qunet"], grouped["prepared"]
    groups = qdiff_ao.graph_info(prepared).timestep_groups
    kept = [g["kept"] for g in groups.report["groups"]]
    assert sum(kept) >= 1 and len(qunet._graphs) == 1 + sum(kept)
    for g, ts in enumerate(groups.report["groups"]):
        t = int(ts["timesteps"][0])
        x = _inputs(2, t, 11)
        if kept[g]:
            reference = X86Backend().convert(prepared_for_group(prepared, g)[0])
        else:
            reference = X86Backend().convert(prepared_for_group(prepared, g)[0])  # no qparam differs: single grids
            assert not prepared_for_group(prepared, g)[1]
        with torch.no_grad():
            assert torch.equal(qunet(**x).sample, reference(**x))
    base = dict(qunet.graph_module.named_modules())
    shared = 0
    for graph in qunet._graphs[1:]:
        for name, module in graph.named_modules():
            if hasattr(module, "_packed_params") and name in base:
                assert module._packed_params is base[name]._packed_params
                shared += 1
    assert shared > 0


def test_mixed_timestep_batch_is_split_by_group_and_frozen_runs_agree(grouped: dict[str, Any]) -> None:
    qunet = copy.deepcopy(grouped["qunet"])
    xs = [_inputs(1, t, 9) for t in TIMESTEPS]
    mixed = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    with torch.no_grad():
        together = qunet(**mixed).sample
        alone = torch.cat([qunet(**x).sample for x in xs])
        assert torch.equal(together, alone)
        qunet.optimize_for_inference(integer_attention=False)  # the same kernels: bit-identical
        assert qunet.optimized and len(qunet._frozen) == len(qunet._graphs)
        assert torch.equal(qunet(**mixed).sample, together)
        # Integer attention: f32 rounding of the sums can move a probability on a tie by one code, and through this
        # random-weight UNet's requantizations that grows to ~1.5%: within test_lowering's kernel-rounding bound
        qunet.optimize_for_inference()
        fast = qunet(**mixed).sample
        assert float((fast - together).norm() / together.norm()) < 0.05


def test_checkpoint_round_trip_keeps_the_groups(grouped: dict[str, Any], tmp_path: Path) -> None:
    qunet = grouped["qunet"]
    path = qunet.save_pretrained(tmp_path / "ckpt")
    body = json.loads((path / "config.json").read_text())
    # 2 with timestep groups, 3 when the output correction also keeps input gains, 4 when it holds the spread
    correction = body.get("output_correction", {})
    assert body["format_version"] == (4 if correction.get("spread") else 3 if correction.get("input_gain") else 2)
    assert body["timestep_groups"]["boundaries"] == list(qunet.timestep_group_boundaries)
    loaded = qdiff_ao.QuantizedUNet.from_pretrained(path)
    assert loaded.timestep_group_boundaries == qunet.timestep_group_boundaries
    xs = [_inputs(1, t, 5) for t in TIMESTEPS]
    mixed = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
    with torch.no_grad():
        assert torch.equal(loaded(**mixed).sample, qunet(**mixed).sample)


def test_checkpoint_with_an_edited_group_record_is_refused(grouped: dict[str, Any], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from qdiff_ao.deploy.checkpoint.files import read_checkpoint, write_checkpoint

    path = grouped["qunet"].save_pretrained(tmp_path / "ckpt")
    body, tensors = read_checkpoint(path)
    body = {k: v for k, v in body.items() if k not in ("tensors_bytes", "tensors_sha256")}
    dropped = next(k for k in tensors if k.startswith("timestep_groups."))
    edited = write_checkpoint(tmp_path / "edited", body, {k: v for k, v in tensors.items() if k != dropped},
                              overwrite=False)
    with pytest.raises(CheckpointError, match="timestep-group tensors"):
        qdiff_ao.QuantizedUNet.from_pretrained(edited)
    assert load_file(path / "model.safetensors")  # the original is untouched
    del save_file


def test_onnx_export_of_a_grouped_graph_needs_a_group(grouped: dict[str, Any], tmp_path: Path) -> None:
    prepared = grouped["prepared"]
    with pytest.raises(ValueError, match="timestep_group=g"):
        qdiff_ao.export_onnx(prepared, tmp_path / "m.onnx", _inputs(1, 500, 1))


def test_one_group_or_no_act_quantization_leaves_the_graph_single(grouped: dict[str, Any]) -> None:
    unet, calib = grouped["unet"], grouped["calib"]
    fast = dict(calib=calib, batch_size=8, progress=False, reconstruct=False, precision_fallback=False,
                bias_correction=False)
    one = qdiff_ao.quantize(unet, DDIMScheduler(), qdiff_ao.QuantConfig(), timestep_groups=1, **fast)
    assert one.timestep_group_boundaries == () and one.quantization_info["timestep_groups"] is None
    weights_only = qdiff_ao.quantize(unet, DDIMScheduler(), qdiff_ao.QuantConfig(act_bits=None), **fast)
    assert weights_only.quantization_info["timestep_groups"] is None  # no activation grid to group
    with pytest.raises(ValueError, match="timestep_groups must be an int >= 1"):
        qdiff_ao.quantize(unet, DDIMScheduler(), qdiff_ao.QuantConfig(), timestep_groups=0, **fast)


def test_choose_timestep_groups_refuses_bad_input(grouped: dict[str, Any]) -> None:
    prepared, calib = grouped["prepared"], grouped["calib"]
    with pytest.raises(ValueError, match="already has timestep groups"):
        qdiff_ao.passes.choose_timestep_groups(prepared, calib)
    with pytest.raises(ValueError, match="num_groups >= 1"):
        qdiff_ao.passes.choose_timestep_groups(prepared, calib, num_groups=0)
    with pytest.raises(TypeError, match="CalibrationSet"):
        qdiff_ao.passes.choose_timestep_groups(prepared, {"sample": torch.zeros(1)})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="run reconstruct before"):
        qdiff_ao.passes.reconstruct(prepared, calib)
