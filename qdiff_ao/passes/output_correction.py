"""Output correction per group of timesteps, kept only where it lowers the error on held-back rows.

The quantization error of a UNet's noise prediction has a systematic part that changes along the trajectory
(PTQD, He et al. 2023: ``eps_q ~ (1 + k_t) eps + b_t``). A single static bias (``correct_output_bias``) removes
its trajectory average and can over-correct the steps where the offset has another sign -- typically the
last steps near ``t = 0``. Here the timesteps of the calibration set are cut into ``G`` contiguous groups
(equal numbers of calibration timesteps) and each group ``g`` gets its own per-channel offset

    b_{g,c} = mean over rows n in g and positions (h, w) of  [ y_q(n, c, h, w) - y_fp(n, c, h, w) ]

with ``y_q`` the fake-quant simulation's output and ``y_fp`` the float model's, both as the sampler uses them
(with classifier-free guidance, the guided combination of each trajectory's two rows: subtracting ``b`` from
both rows shifts the guided output by exactly ``b``). Rows of every timestep are split by trajectory into a
fitting half and a held-back half: ``b_g`` is fitted on the first and kept only if it lowers the mean squared
error ``|y_q - b_g - y_fp|^2`` on the second (otherwise ``b_g = 0``); kept offsets are then re-estimated on all
rows of the group. So the correction never makes a group worse on data it was not fitted on.

Lowering: a :class:`TimestepOutputCorrection` node after the graph's output computes
``y - b[g(t)]`` with ``g(t)`` = the group whose timestep interval holds ``t`` (boundaries half-way between
adjacent groups); it runs in float after the last dequantize, a ``(B, C)`` gather and one subtraction, and is
saved in checkpoints like any float tensor.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import fx, nn

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.distributed import deal, sum_over_ranks, sum_tensor_over_ranks
from qdiff_ao.calibration.sampler_view import RowGroup, timestep_rows
from qdiff_ao.calibration.sensitivity import _output_tensor
from qdiff_ao.capture.graph_state import update_graph_info
from qdiff_ao.capture.input_guards import is_input_guard
from qdiff_ao.quantizers.simulation import build_simulation

__all__ = ["OUTPUT_CORRECTION", "TimestepOutputCorrection", "add_output_correction", "correct_output"]

logger = logging.getLogger(__name__)

OUTPUT_CORRECTION = "qdiff_output_correction"
"""Module name of the correction in the graph."""


class TimestepOutputCorrection(nn.Module):
    """``y - bias[g(t)]`` with ``g(t) = #{boundaries <= t}`` (``torch.bucketize(t, boundaries, right=True)``).

    Buffers: ``boundaries`` ``(G - 1,)`` ascending timesteps, ``bias`` ``(G, C)``.
    """

    boundaries: torch.Tensor
    bias: torch.Tensor

    def __init__(self, num_groups: int, channels: int) -> None:
        super().__init__()
        if num_groups < 1 or channels < 1:
            raise ValueError(f"need num_groups >= 1 and channels >= 1, got {num_groups}, {channels}")
        self.register_buffer("boundaries", torch.zeros(num_groups - 1))
        self.register_buffer("bias", torch.zeros(num_groups, channels))

    def group_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """Group index of each timestep."""
        return torch.bucketize(timestep.reshape(-1).to(self.boundaries.dtype), self.boundaries, right=True)

    def forward(self, y: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        b = self.bias[self.group_of(timestep)]
        return y - b.view(b.shape[0], b.shape[1], *([1] * (y.dim() - 2)))


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


def add_output_correction(gm: fx.GraphModule, num_groups: int, channels: int) -> TimestepOutputCorrection:
    """Insert a zero :class:`TimestepOutputCorrection` before the graph output (once); returns it."""
    if hasattr(gm, OUTPUT_CORRECTION):
        module = cast(TimestepOutputCorrection, getattr(gm, OUTPUT_CORRECTION))
        if tuple(module.bias.shape) != (num_groups, channels):
            raise ValueError(f"the graph already has an output correction of shape {tuple(module.bias.shape)}")
        return module
    device = next((p.device for p in gm.parameters()), torch.device("cpu"))
    module = TimestepOutputCorrection(num_groups, channels).to(device)
    gm.add_submodule(OUTPUT_CORRECTION, module)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    value, rebuild = _output_value(out_node)
    t_node = _timestep_node(gm)
    with gm.graph.inserting_before(out_node):
        corrected = gm.graph.call_module(OUTPUT_CORRECTION, (value, t_node))
    out_node.args = (rebuild(corrected),)
    gm.recompile()
    return module


def _groups(timesteps: list[float], num_groups: int) -> list[list[float]]:
    g = max(1, min(num_groups, len(timesteps)))
    size, extra = divmod(len(timesteps), g)
    out, start = [], 0
    for i in range(g):
        stop = start + size + (1 if i < extra else 0)
        out.append(timesteps[start:stop])
        start = stop
    return out


def _channel_stats(diff: torch.Tensor) -> tuple[torch.Tensor, int]:
    dims = [d for d in range(diff.dim()) if d != 1]
    return diff.double().sum(dim=dims), diff.numel() // diff.shape[1]


@torch.no_grad()
def correct_output(
    prepared: fx.GraphModule,
    calib: CalibrationSet,
    model: nn.Module,
    *,
    num_groups: int = 8,
    batch_size: int = 32,
) -> fx.GraphModule:
    """Fit and insert the per-timestep-group output correction (see the module docstring); in place.

    Run after ``calibrate`` and ``reconstruct``, before ``convert``.

    Args:
        prepared: a calibrated output of ``qdiff_ao.prepare``.
        calib: calibration set with at least 2 rows per timestep (one to fit, one to check).
        model: the float diffusers UNet the graph was traced from.
        num_groups: ``G``, at most the number of calibration timesteps.
        batch_size: rows per forward.

    Returns:
        ``prepared``, with the report ``{"groups": [{"timesteps", "kept", "mse_before", "mse_after",
        "mean_abs_offset"}], "boundaries", "num_groups_kept"}`` in ``graph_info(prepared).bias_correction``.

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
    names = [str(n.target) for n in sim.gm.graph.nodes if n.op == "placeholder"]
    timesteps = [float(t) for t in calib.timesteps()]
    groups = _groups(timesteps, num_groups)
    group_of_t = {t: gi for gi, ts in enumerate(groups) for t in ts}

    def outputs(group: RowGroup) -> tuple[torch.Tensor, torch.Tensor]:
        y_q, y_fp = [], []
        for start in range(0, len(group), batch_size):
            inputs = calib._rows(group.index[start:start + batch_size])
            y_q.append(_output_tensor(sim.gm(**{k: inputs[k] for k in names if k in inputs})))
            y_fp.append(_output_tensor(model(**inputs)))
        return torch.cat(y_q), torch.cat(y_fp)

    # Per group: channel sums of the fitting half and of all rows, value counts, held-back differences. On a
    # process group each rank runs its share of the timesteps and the sums are added up over the ranks.
    fit_sum: dict[int, torch.Tensor] = {}
    all_sum: dict[int, torch.Tensor] = {}
    counts = torch.zeros(2, len(groups), dtype=torch.float64)  # [fit, all] values per channel
    held: list[list[torch.Tensor]] = [[] for _ in groups]
    for ti in deal(len(all_t)):
        t = all_t[ti]
        gi = group_of_t[float(t)]
        for part, rows in zip(("fit", "held"), halves[float(t)], strict=True):
            y_q, y_fp = outputs(rows)
            diff = rows.sampler_output(y_q) - rows.sampler_output(y_fp)
            s, c = _channel_stats(diff)
            all_sum[gi] = all_sum[gi] + s if gi in all_sum else s
            counts[1, gi] += c
            if part == "fit":
                fit_sum[gi] = fit_sum[gi] + s if gi in fit_sum else s
                counts[0, gi] += c
            else:
                held[gi].append(diff.double())
    # every rank with rows knows the output's channel count C; a rank without rows learns it here
    have, total = sum_over_ranks([float(bool(all_sum)), float(next((v.numel() for v in all_sum.values()), 0))])
    channels = round(total / have)

    def over_ranks(sums: dict[int, torch.Tensor]) -> torch.Tensor:
        zero = torch.zeros(channels, dtype=torch.float64)
        return sum_tensor_over_ranks(torch.stack([sums.get(g, zero) for g in range(len(groups))]))

    fit_total, all_total = over_ranks(fit_sum), over_ranks(all_sum)
    counts = sum_tensor_over_ranks(counts)
    b_fit = fit_total / counts[0].unsqueeze(1)
    # held-back squared error without and with the fitted offset: sums over this rank's rows, then over ranks
    held_sq = torch.zeros(3, len(groups), dtype=torch.float64)  # [before, after, values]
    for gi in range(len(groups)):
        for diffs in held[gi]:
            shape = (1, channels, *([1] * (diffs.dim() - 2)))
            held_sq[0, gi] += diffs.pow(2).sum()
            held_sq[1, gi] += (diffs - b_fit[gi].view(shape)).pow(2).sum()
            held_sq[2, gi] += diffs.numel()
    held_sq = sum_tensor_over_ranks(held_sq)
    bias = torch.zeros(len(groups), channels, dtype=torch.float64)
    report_groups = []
    for gi, ts in enumerate(groups):
        before = float(held_sq[0, gi] / held_sq[2, gi])
        after = float(held_sq[1, gi] / held_sq[2, gi])
        kept = after < before
        if kept:
            bias[gi] = all_total[gi] / counts[1, gi]
        report_groups.append({"timesteps": ts, "kept": kept, "mse_before": before, "mse_after": after,
                              "mean_abs_offset": float(bias[gi].abs().mean())})
    boundaries = [(groups[i][-1] + groups[i + 1][0]) / 2 for i in range(len(groups) - 1)]
    module = add_output_correction(prepared, len(groups), channels)
    module.boundaries.copy_(torch.tensor(boundaries, dtype=module.boundaries.dtype))
    module.bias.copy_(bias.to(module.bias.dtype))
    report = {"method": "timestep_groups", "boundaries": boundaries, "groups": report_groups,
              "num_groups_kept": sum(1 for g in report_groups if g["kept"]), "num_samples": len(calib)}
    update_graph_info(prepared, bias_correction=report)
    logger.info("output correction: %d of %d timestep groups kept", report["num_groups_kept"], len(groups))
    return prepared
