"""Output correction per group of timesteps, kept only where it lowers the error on held-back rows.

The quantization error of a UNet's noise prediction has a systematic part that changes along the trajectory
(PTQD, He et al. 2023: ``eps_q ~ (1 + k_t) eps + b_t``). A single static bias (``correct_output_bias``) removes
its trajectory average and can over-correct the steps where the offset has another sign -- typically the
last steps near ``t = 0``. Here the timesteps of the calibration set are cut into ``G`` contiguous groups
(equal numbers of calibration timesteps) and each group ``g`` gets, per output channel ``c``, one of

* nothing: ``y' = y``;
* an offset: ``y' = y - b_{g,c}`` with ``b_{g,c} = mean(y_q - y_fp)`` over the group's rows and positions;
* a gain and an offset (PTQD's view, inverted): the least-squares line ``y_fp ~ a_{g,c} y_q + d_{g,c}``,

      a = cov(y_q, y_fp) / var(y_q),   d = mean(y_fp) - a mean(y_q),   y' = a y - b  with  b = -d

  (so ``1 + k = 1 / a``: the gain undoes the scaled-down or scaled-up copy of ``eps`` in ``eps_q``),

with ``y_q`` the fake-quant simulation's output and ``y_fp`` the float model's, both as the sampler uses them
(with classifier-free guidance, the guided combination ``u + s (c - u)`` of each trajectory's two rows: the
weights ``1 - s`` and ``s`` add up to 1, so applying ``a y - b`` to both rows applies it to the guided output).
Rows of every timestep are split by trajectory into a fitting half and a held-back half: each candidate is
fitted on the first and the one with the lowest mean squared error ``|y' - y_fp|^2`` on the second is chosen
(nothing wins ties); chosen corrections are then re-estimated on all rows of the group. So the correction never
makes a group worse on data it was not fitted on.

Lowering: a :class:`TimestepOutputCorrection` node after the graph's output computes ``a[g(t)] y - b[g(t)]``
(without gains, ``y - b[g(t)]``) with ``g(t)`` = the group whose timestep interval holds ``t`` (boundaries
half-way between adjacent groups); it runs in float after the last dequantize, a ``(B, C)`` gather, one multiply
and one subtraction, and is saved in checkpoints like any float tensor.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import fx, nn

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.distributed import deal, sum_over_ranks, sum_tensor_over_ranks
from qdiff_ao.calibration.sampler_view import RowGroup, timestep_rows
from qdiff_ao.capture.graph_state import update_graph_info
from qdiff_ao.capture.input_guards import is_input_guard
from qdiff_ao.quantizers.simulation import build_simulation, output_tensor
from qdiff_ao.quantizers.timestep_grids import contiguous_groups, group_boundaries

__all__ = ["OUTPUT_CORRECTION", "TimestepOutputCorrection", "add_output_correction", "correct_output"]

logger = logging.getLogger(__name__)

OUTPUT_CORRECTION = "qdiff_output_correction"
"""Module name of the correction in the graph."""


class TimestepOutputCorrection(nn.Module):
    """``gain[g(t)] * y - bias[g(t)]`` with ``g(t) = #{boundaries <= t}`` (``torch.bucketize(t, boundaries,
    right=True)``); without gains (``gain=False``, the layout of checkpoints before gains existed) ``y - bias[g(t)]``.

    Buffers: ``boundaries`` ``(G - 1,)`` ascending timesteps, ``bias`` ``(G, C)``, ``gain`` ``(G, C)`` (ones
    where a group keeps no gain) when ``gain=True``.
    """

    boundaries: torch.Tensor
    bias: torch.Tensor
    gain: torch.Tensor | None

    def __init__(self, num_groups: int, channels: int, gain: bool = False) -> None:
        super().__init__()
        if num_groups < 1 or channels < 1:
            raise ValueError(f"need num_groups >= 1 and channels >= 1, got {num_groups}, {channels}")
        self.register_buffer("boundaries", torch.zeros(num_groups - 1))
        self.register_buffer("bias", torch.zeros(num_groups, channels))
        self.register_buffer("gain", torch.ones(num_groups, channels) if gain else None)

    def group_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """Group index of each timestep."""
        return torch.bucketize(timestep.reshape(-1).to(self.boundaries.dtype), self.boundaries, right=True)

    def forward(self, y: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        g = self.group_of(timestep)
        shape = (g.shape[0], self.bias.shape[1], *([1] * (y.dim() - 2)))
        if self.gain is not None:
            y = y * self.gain[g].view(shape)
        return y - self.bias[g].view(shape)


def _output_value(out_node: fx.Node) -> tuple[fx.Node, Any]:
    """(the node producing the output tensor, a function rebuilding the output args around a replacement)."""
    arg = out_node.args[0]
    if isinstance(arg, fx.Node):
        return arg, lambda new: new
    if isinstance(arg, (tuple, list)) and arg and isinstance(arg[0], fx.Node):
        return arg[0], lambda new: type(arg)([new, *arg[1:]])
    if isinstance(arg, dict) and isinstance(arg.get("sample"), fx.Node):
        return arg["sample"], lambda new: {**arg, "sample": new}
    raise ValueError(f"cannot find the UNet output tensor in the graph output {arg!r}")


def _timestep_node(gm: fx.GraphModule) -> fx.Node:
    for node in gm.graph.nodes:
        if node.op == "placeholder" and str(node.target) == "timestep":
            guards = [u for u in node.users if is_input_guard(u)]
            return guards[0] if guards else node
    raise ValueError("the graph has no 'timestep' input; the output correction needs the UNet's timestep")


def add_output_correction(gm: fx.GraphModule, num_groups: int, channels: int,
                          gain: bool = False) -> TimestepOutputCorrection:
    """Insert an identity :class:`TimestepOutputCorrection` before the graph output (once); returns it."""
    if hasattr(gm, OUTPUT_CORRECTION):
        module = cast(TimestepOutputCorrection, getattr(gm, OUTPUT_CORRECTION))
        if tuple(module.bias.shape) != (num_groups, channels) or (module.gain is not None) != gain:
            raise ValueError(f"the graph already has an output correction of shape {tuple(module.bias.shape)} "
                             f"({'with' if module.gain is not None else 'without'} gains)")
        return module
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    module = TimestepOutputCorrection(num_groups, channels, gain=gain).to(device)
    gm.add_submodule(OUTPUT_CORRECTION, module)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    value, rebuild = _output_value(out_node)
    t_node = _timestep_node(gm)
    with gm.graph.inserting_before(out_node):
        corrected = gm.graph.call_module(OUTPUT_CORRECTION, (value, t_node))
    out_node.args = (rebuild(corrected),)
    gm.recompile()
    return module


_MOMENTS = 5  # per channel: count, sum q, sum f, sum q^2, sum q*f


def _channel_moments(y_q: torch.Tensor, y_fp: torch.Tensor) -> torch.Tensor:
    """``(5, C)`` float64: value count, ``sum q``, ``sum f``, ``sum q^2``, ``sum q f`` per channel (dim 1)."""
    q, f = y_q.double(), y_fp.double()
    dims = [d for d in range(q.dim()) if d != 1]
    count = torch.full((q.shape[1],), float(q.numel() // q.shape[1]), dtype=torch.float64)
    return torch.stack([count, q.sum(dims), f.sum(dims), (q * q).sum(dims), (q * f).sum(dims)])


def _fit(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From ``(5, C)`` moments: the offset ``b = mean(q - f)``, and the line ``f ~ a q + d`` as ``(a, -d)``.

    ``a = (sum qf / n - mean q mean f) / (sum q^2 / n - mean q^2)``; a channel whose ``q`` does not vary
    (variance <= 1e-12 of its second moment) gets ``a = 1``.
    """
    n, sq, sf, sqq, sqf = moments
    mq, mf = sq / n, sf / n
    var = sqq / n - mq * mq
    gain = torch.where(var > 1e-12 * (sqq / n).clamp_min(1e-30), (sqf / n - mq * mf) / var.clamp_min(1e-30),
                       torch.ones_like(var))
    return mq - mf, gain, gain * mq - mf


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


@torch.no_grad()
def correct_output(
    prepared: fx.GraphModule,
    calib: CalibrationSet,
    model: nn.Module,
    *,
    num_groups: int = 8,
    gain: bool = False,
    batch_size: int = 32,
) -> fx.GraphModule:
    """Fit and insert the per-timestep-group output correction (see the module docstring); in place.

    Run after ``calibrate`` and ``reconstruct``, before ``convert``.

    Args:
        prepared: a calibrated output of ``qdiff_ao.prepare``.
        calib: calibration set with at least 2 rows per timestep (one to fit, one to check).
        model: the float diffusers UNet the graph was traced from.
        num_groups: ``G``, at most the number of calibration timesteps.
        gain: also offer each group the gain-and-offset correction (default ``False``: offsets only; the gains
            lowered the held-back error by a few percent but did not move the sample FD, see docs/DESIGN.md).
        batch_size: rows per forward.

    Returns:
        ``prepared``, with the report ``{"groups": [{"timesteps", "kept", "kind", "mse_before", "mse_after",
        "mse_offset", "mse_gain", "mean_abs_offset", "mean_gain"}], "boundaries", "num_groups_kept"}`` in
        ``graph_info(prepared).bias_correction`` (``kind``: ``"none"``, ``"offset"`` or ``"gain"``; ``mse_*`` on
        the held-back rows, ``mse_gain`` ``None`` without gains).

    Raises:
        TypeError / ValueError: wrong argument types, ``num_groups < 1``, a set with fewer than 2 rows at some
        timestep, or a graph without a ``timestep`` input.
    """
    if not isinstance(prepared, fx.GraphModule):
        raise TypeError(f"prepared must be the GraphModule returned by qdiff_ao.prepare, got {type(prepared).__name__}")
    if not isinstance(calib, CalibrationSet):
        raise TypeError(f"calib must be a qdiff_ao.CalibrationSet, got {type(calib).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the float diffusers UNet (an nn.Module), got {type(model).__name__}")
    if num_groups < 1 or batch_size < 1:
        raise ValueError(f"need num_groups >= 1 and batch_size >= 1, got {num_groups}, {batch_size}")
    all_t = calib.timesteps()
    halves = {float(t): timestep_rows(calib, t).split() for t in all_t}  # (fit, held) rows per timestep
    if min(len(part) for parts in halves.values() for part in parts) == 0:
        raise ValueError("correct_output needs >= 2 trajectories per timestep (half to fit, half to check); collect "
                         "the calibration set with samples_per_timestep >= 2")
    sim = build_simulation(prepared)
    sim.gm.eval()
    timesteps = [float(t) for t in calib.timesteps()]
    groups = contiguous_groups(timesteps, num_groups)
    group_of_t = {t: gi for gi, ts in enumerate(groups) for t in ts}

    def outputs(group: RowGroup) -> tuple[torch.Tensor, torch.Tensor]:
        y_q, y_fp = [], []
        for start in range(0, len(group), batch_size):
            inputs = calib._rows(group.index[start:start + batch_size])
            y_q.append(sim.run(inputs))  # with timestep groups: the group's grids, as the lowered model runs
            y_fp.append(output_tensor(model(**inputs)))
        return group.sampler_output(torch.cat(y_q)), group.sampler_output(torch.cat(y_fp))

    # Per group: channel moments of the fitting half and of all rows, and the held-back outputs. On a process
    # group each rank runs its share of the timesteps and the moments are added up over the ranks.
    fit_mom: dict[int, torch.Tensor] = {}
    all_mom: dict[int, torch.Tensor] = {}
    held: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in groups]
    for ti in deal(len(all_t)):
        t = all_t[ti]
        gi = group_of_t[float(t)]
        for part, rows in zip(("fit", "held"), halves[float(t)], strict=True):
            y_q, y_fp = outputs(rows)
            m = _channel_moments(y_q, y_fp)
            all_mom[gi] = all_mom[gi] + m if gi in all_mom else m
            if part == "fit":
                fit_mom[gi] = fit_mom[gi] + m if gi in fit_mom else m
            else:
                held[gi].append((y_q, y_fp))
    # every rank with rows knows the output's channel count C; a rank without rows learns it here
    have, total = sum_over_ranks([float(bool(all_mom)), float(next((v.shape[1] for v in all_mom.values()), 0))])
    channels = round(total / have)

    def over_ranks(moments: dict[int, torch.Tensor]) -> torch.Tensor:
        zero = torch.zeros(_MOMENTS, channels, dtype=torch.float64)
        return sum_tensor_over_ranks(torch.stack([moments.get(g, zero) for g in range(len(groups))]))

    fit_total, all_total = over_ranks(fit_mom), over_ranks(all_mom)
    # held-back squared error of each candidate: sums over this rank's rows, then over ranks
    held_sq = torch.zeros(4, len(groups), dtype=torch.float64)  # [none, offset, gain, values]
    for gi in range(len(groups)):
        b_fit, a_fit, ab_fit = _fit(fit_total[gi])
        for q, f in held[gi]:
            y_q, y_fp = q.double(), f.double()
            held_sq[0, gi] += (y_q - y_fp).pow(2).sum()
            held_sq[1, gi] += (y_q - _view(b_fit, y_q) - y_fp).pow(2).sum()
            if gain:  # the gain candidate is only scored when it is offered
                held_sq[2, gi] += (_view(a_fit, y_q) * y_q - _view(ab_fit, y_q) - y_fp).pow(2).sum()
            held_sq[3, gi] += y_q.numel()
    held_sq = sum_tensor_over_ranks(held_sq)
    bias = torch.zeros(len(groups), channels, dtype=torch.float64)
    gains = torch.ones(len(groups), channels, dtype=torch.float64)
    report_groups = []
    for gi, ts in enumerate(groups):
        mse = {kind: float(held_sq[i, gi] / held_sq[3, gi]) for i, kind in enumerate(("none", "offset", "gain"))}
        candidates = ("none", "offset", "gain") if gain else ("none", "offset")
        kind = min(candidates, key=lambda k: mse[k])  # min keeps the first of equals: "none" wins ties
        b_all, a_all, ab_all = _fit(all_total[gi])
        if kind == "offset":
            bias[gi] = b_all
        elif kind == "gain":
            gains[gi], bias[gi] = a_all, ab_all
        report_groups.append({"timesteps": ts, "kept": kind != "none", "kind": kind, "mse_before": mse["none"],
                              "mse_after": mse[kind], "mse_offset": mse["offset"],
                              "mse_gain": mse["gain"] if gain else None,
                              "mean_abs_offset": float(bias[gi].abs().mean()), "mean_gain": float(gains[gi].mean())})
    boundaries = group_boundaries(groups)
    module = add_output_correction(prepared, len(groups), channels, gain=gain)
    module.boundaries.copy_(torch.tensor(boundaries, dtype=module.boundaries.dtype))
    module.bias.copy_(bias.to(module.bias.dtype))
    if module.gain is not None:
        module.gain.copy_(gains.to(module.gain.dtype))
    report = {"method": "timestep_groups", "boundaries": boundaries, "groups": report_groups,
              "num_groups_kept": sum(1 for g in report_groups if g["kept"]), "num_samples": len(calib)}
    update_graph_info(prepared, bias_correction=report)
    logger.info("output correction: %d of %d timestep groups kept", report["num_groups_kept"], len(groups))
    return prepared
