"""Activation grids per group of timesteps, kept only where held-back rows say they help (#15 item 3).

A UNet's activation ranges drift along the denoising trajectory, and one grid per activation is a compromise: the
late steps, whose inputs are small, get the coarse step the noisy early steps set. Here the calibration
timesteps are cut into ``G`` contiguous groups (equal counts) and each group may get its own grid for every
per-tensor activation quantizer of up to 8 bits (weights stay shared):

1. On the fitting half of every timestep's rows (trajectories split in two by ``RowGroup.split``)
   the float input range of each quantizer is recorded per timestep.
2. Group ``g``'s candidate grid for a quantizer maps its final grid (after calibration and reconstruction) from
   the range over all timesteps onto the group's range
   (:func:`~qdiff_ao.quantizers.timestep_grids.mapped_grid`: the clipping the recipe chose, carried over).
3. On the held-back half of the group's rows the squared error of the model output as the sampler uses it
   (guided with classifier-free guidance) is measured with the single grids and with the group's grids; the group
   keeps its grids only if they lower that error (nothing wins ties). So a group never gets grids that made its
   held-back rows worse.

The result goes into ``graph_info(prepared).timestep_groups`` (a
:class:`~qdiff_ao.quantizers.timestep_grids.TimestepGroupGrids`); the fake-quant simulation then runs each row
with its group's grids (so the output correction, run after this pass, is fitted on what will run), and
``qdiff_ao.convert`` lowers each kept group into its own qparams (``QuantizedUNet`` dispatches on the timestep; the
packed weights are shared).

The reference in step 3 is the simulation with every quantizer bypassed (``sim.full_precision``). After
reconstruction that graph runs the baked rounded weights ``W_hat`` (``SimLayer``), so the reference is the model
with quantized weights and float activations, not the float model: the comparison isolates what the activation
grids change. (It therefore cannot read the float outputs the collector records, ``CalibrationSet.float_output``:
on the CIFAR-size recipe they differ from this reference by ~10% rel. L2.)

Cost: one float-activation forward over half the calibration rows, and three simulation forwards (reference,
single grids, group grids) over the other half.
On a process group every rank runs all rows (the choice is the same on every rank).
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import fx

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.sampler_view import RowGroup, timestep_rows
from qdiff_ao.capture.graph_state import graph_info, update_graph_info
from qdiff_ao.passes.attention_operands import is_symmetric_observer
from qdiff_ao.quantizers.adaround import LearnedStepQuant
from qdiff_ao.quantizers.simulation import Simulation, build_simulation
from qdiff_ao.quantizers.timestep_grids import (
    TimestepGroupGrids,
    contiguous_groups,
    group_boundaries,
    mapped_grid,
)

__all__ = ["choose_timestep_groups"]

logger = logging.getLogger(__name__)

_MAX_LEVELS = 255  # grids of up to 8 bits have integer kernels; wider ones (16-bit softmax) stay as they are


def _grouped_quantizers(sim: Simulation) -> dict[str, LearnedStepQuant]:
    """The per-tensor activation quantizers of at most 8 bits, by name."""
    out = {}
    for name, act in sim.acts.items():
        q = act.quant
        if isinstance(q, LearnedStepQuant) and q.quant_max - q.quant_min <= _MAX_LEVELS:
            out[name] = q
    return out


def _record_ranges(sim: Simulation, calib: CalibrationSet, parts: dict[float, RowGroup], names: list[str],
                   batch_size: int) -> dict[str, dict[float, tuple[float, float]]]:
    """``{quantizer: {timestep: (min, max)}}`` of each quantizer's float input over the rows of ``parts``."""
    ranges: dict[str, dict[float, tuple[float, float]]] = {n: {} for n in names}
    current = [0.0]

    def recorder(name: str) -> Any:
        def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach()
            lo, hi = float(x.min()), float(x.max())
            a, b = ranges[name].get(current[0], (lo, hi))
            ranges[name][current[0]] = (min(a, lo), max(b, hi))
        return hook

    handles = [sim.acts[n].register_forward_pre_hook(recorder(n)) for n in names]
    try:
        with sim.full_precision():
            for t, rows in parts.items():
                current[0] = t
                for start in range(0, len(rows), batch_size):
                    sim.run(calib._rows(rows.index[start:start + batch_size]))
    finally:
        for h in handles:
            h.remove()
    return ranges


def _sampler_output(sim: Simulation, calib: CalibrationSet, rows: RowGroup, batch_size: int, group: int | None,
                    fp: bool = False) -> torch.Tensor:
    """The sampler output (float64) of the simulation on ``rows``: group ``group``'s grids, or the float model."""
    out = []
    for start in range(0, len(rows), batch_size):
        inputs = calib._rows(rows.index[start:start + batch_size])
        with sim.state.in_group(group), sim.state.precision(fp):
            out.append(sim.run(inputs))
    return rows.sampler_output(torch.cat(out)).double()


def _squared_error(sim: Simulation, calib: CalibrationSet, rows: RowGroup, batch_size: int, group: int | None,
                   reference: torch.Tensor) -> tuple[float, int]:
    """(sum of squared errors of the sampler output vs ``reference``, number of values)."""
    q = _sampler_output(sim, calib, rows, batch_size, group)
    return float((q - reference).pow(2).sum()), q.numel()


@torch.no_grad()
def choose_timestep_groups(
    prepared: fx.GraphModule,
    calib: CalibrationSet,
    *,
    num_groups: int = 4,
    batch_size: int = 32,
) -> fx.GraphModule:
    """Choose per-timestep-group activation grids (module docstring) and record them in the graph info; in place.

    Run after calibration and reconstruction, before the output correction and ``convert``.

    Args:
        prepared: a calibrated output of ``qdiff_ao.prepare`` (without timestep groups yet).
        calib: calibration set with at least 2 trajectories per timestep (half to fit, half to check).
        num_groups: ``G``, at most the number of calibration timesteps (``1``: nothing to choose).
        batch_size: rows per forward.

    Returns:
        ``prepared``; ``graph_info(prepared).timestep_groups`` holds the grids of the kept groups (every other
        group holds the single grids) and the report ``{"groups": [{"timesteps", "kept", "mse_single",
        "mse_group"}], "num_groups_kept", "quantizers"}`` (``mse_*``: mean squared error of the sampler output on
        the held-back rows). When no group is kept, the boundaries are empty (one group: the single grids).

    Raises:
        TypeError / ValueError: wrong argument types, ``num_groups < 1``, a graph that already has timestep groups,
        or a set with fewer than 2 trajectories at some timestep.
    """
    if not isinstance(prepared, fx.GraphModule):
        raise TypeError(f"prepared must be the GraphModule returned by qdiff_ao.prepare, got {type(prepared).__name__}")
    if not isinstance(calib, CalibrationSet):
        raise TypeError(f"calib must be a qdiff_ao.CalibrationSet, got {type(calib).__name__}")
    if not isinstance(num_groups, int) or num_groups < 1 or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"need integers num_groups >= 1 and batch_size >= 1, got {num_groups!r}, {batch_size!r}")
    if graph_info(prepared).timestep_groups is not None:
        raise ValueError("the graph already has timestep groups; choose them once, on a freshly calibrated graph")
    timesteps = [float(t) for t in calib.timesteps()]
    halves = {t: timestep_rows(calib, t).split() for t in timesteps}  # (fit, held) rows per timestep
    if min(len(part) for parts in halves.values() for part in parts) == 0:
        raise ValueError("choose_timestep_groups needs >= 2 trajectories per timestep (half to fit, half to check); "
                         "collect the calibration set with samples_per_timestep >= 2")
    groups = contiguous_groups(timesteps, num_groups)
    sim = build_simulation(prepared)
    sim.gm.eval()
    quants = _grouped_quantizers(sim)
    names = sorted(quants)
    ranges = _record_ranges(sim, calib, {t: halves[t][0] for t in timesteps}, names, batch_size)
    single = {n: (float(q.init_scale), int(q.zero_point)) for n, q in quants.items()}
    group_grids: dict[str, list[tuple[float, int]]] = {n: [single[n]] * len(groups) for n in names}
    for name in names:
        q, r = quants[name], ranges[name]
        s0, z0 = single[name]
        grid = (s0 * (q.quant_min - z0), s0 * (q.quant_max - z0))
        full = (min(v[0] for v in r.values()), max(v[1] for v in r.values()))
        for gi, ts in enumerate(groups):
            group_range = (min(r[t][0] for t in ts), max(r[t][1] for t in ts))
            group_grids[name][gi] = mapped_grid(grid, full, group_range, q.quant_min, q.quant_max,
                                                symmetric=is_symmetric_observer(prepared.get_submodule(name)))
    report_groups = []
    for gi, ts in enumerate(groups):
        for name in names:  # only group gi differs from the single grids while it is measured
            sim.acts[name].group_grids = tuple(group_grids[name][gi] if g == gi else single[name]
                                               for g in range(len(groups)))
        err_single = err_group = 0.0
        count = 0
        for t in ts:
            # the float-activation output once per timestep (each timestep is in one group), a reference for both
            reference = _sampler_output(sim, calib, halves[t][1], batch_size, None, fp=True)
            a, n = _squared_error(sim, calib, halves[t][1], batch_size, None, reference)
            b, _ = _squared_error(sim, calib, halves[t][1], batch_size, gi, reference)
            err_single, err_group, count = err_single + a, err_group + b, count + n
        report_groups.append({"timesteps": ts, "kept": err_group < err_single, "mse_single": err_single / count,
                              "mse_group": err_group / count})
    for name in names:
        sim.acts[name].group_grids = None
    kept = [bool(g["kept"]) for g in report_groups]
    report = {"groups": report_groups, "num_groups_kept": sum(kept), "quantizers": len(names)}
    if any(kept):
        grids = {n: tuple(group_grids[n][g] if kept[g] else single[n] for g in range(len(groups))) for n in names}
        plan = TimestepGroupGrids(tuple(group_boundaries(groups)), grids, report=report)
    else:
        plan = TimestepGroupGrids((), {}, report=report)
    update_graph_info(prepared, timestep_groups=plan)
    logger.info("timestep groups: %d of %d kept their own activation grids", sum(kept), len(groups))
    return cast(fx.GraphModule, prepared)
