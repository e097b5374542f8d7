"""The per-timestep-group range probe of benchmarks/timestep_group_ranges.py (simulation only, #15 item 3)."""

from __future__ import annotations

import torch

import qdiff_ao
from benchmarks.timestep_group_ranges import GroupGrids, probe_groups
from qdiff_ao.calibration.sampler_view import ErrorProbe
from qdiff_ao.quantizers.simulation import build_simulation
from tests.quality_fixtures import calibrated_prepared, late_step_calib


def test_one_group_holding_every_timestep_keeps_the_recipes_grid() -> None:
    calib = late_step_calib()
    _, prepared = calibrated_prepared(calib)
    sim = build_simulation(prepared)
    probe = ErrorProbe(calib, 4)
    names = [str(n.target) for n in sim.gm.graph.nodes if n.op == "placeholder"]
    grids = GroupGrids(sim, probe, names)
    assert grids.quants, "the probe found no per-tensor activation quantizer"
    before = {n: (float(s), int(q.zero_point)) for n, (q, s, _, _) in grids.quants.items()}
    grids.use([float(t) for t in calib.timesteps()])
    for name, (q, scale, _, _) in grids.quants.items():
        s0, z0 = before[name]
        assert abs(float(scale) - s0) <= 1e-6 * s0, name
        assert int(q.zero_point) == z0, name
    grids.use(None)
    assert {n: (float(s), int(q.zero_point)) for n, (q, s, _, _) in grids.quants.items()} == before


def test_a_group_of_its_own_lets_the_late_steps_see_their_input() -> None:
    # Early rows |x_t| ~ 4, late rows ~ 0.01: with one grid the late rows fall inside one step of the input
    # quantizer; a group of their own gives them a grid of their range.
    calib = late_step_calib()
    _, prepared = calibrated_prepared(calib, qdiff_ao.QuantConfig(weight_bits=8))
    result = probe_groups(prepared, calib, [1, 2], rows_per_timestep=4)
    assert [float(t) for t in result["timesteps"]] == [10.0, 900.0]
    one, two = (row["errors"] for row in result["rows"])
    assert two[0] < 0.5 * one[0], (one, two)
    assert two[1] <= one[1] * 1.05 + 1e-6, (one, two)


def _simulated(prepared: torch.fx.GraphModule, x: dict[str, torch.Tensor]) -> torch.Tensor:
    sim = build_simulation(prepared)
    with torch.no_grad():
        out = sim.gm.eval()(**x)
    return out.sample if hasattr(out, "sample") else out[0] if isinstance(out, tuple) else out


def test_probe_leaves_the_prepared_graphs_quantizers_unchanged() -> None:
    calib = late_step_calib()
    _, prepared = calibrated_prepared(calib)
    x = {k: v for k, v in calib.example_inputs(2).items() if k in ("sample", "timestep")}
    before = _simulated(prepared, x)
    probe_groups(prepared, calib, [1, 2], rows_per_timestep=2)
    assert torch.equal(_simulated(prepared, x), before)
