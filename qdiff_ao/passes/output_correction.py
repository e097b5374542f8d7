"""Output correction per group of timesteps, kept only where it lowers the error on rows left out of its fit.

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
with ``y_q`` the quantized model's output (``sampler_runs.quantized_forward``: on the CPU the lowered INT8 model,
elsewhere the fake-quant simulation) and ``y_fp`` the float model's, both as the sampler uses them
(with classifier-free guidance, the guided combination ``u + s (c - u)`` of each trajectory's two rows: the
weights ``1 - s`` and ``s`` add up to 1, so applying ``a y - b`` to both rows applies it to the guided output).
Each candidate is scored by leaving one trajectory out at a time (a row's trajectory is its position at its
timestep: the collection records trajectory ``j`` at every selected step): it is fitted on the group's other
trajectories and its squared error ``|y' - y_fp|^2`` is measured on the left-out one's rows. All of this comes from
per-trajectory channel moments of ``(y_q, x, y_fp, 1)``, so no output is kept in memory. The candidate with the
lowest summed left-out error is chosen (nothing wins ties), then re-estimated on all rows of the group: it never
makes a group worse on rows it was not fitted on. The report gives, per group, that error for every candidate and
the paired ``z`` of the chosen one against none over the trajectories (``passes.paired_trajectories.paired_z``;
negative: the correction lowers the error).

Why leave-one-out rather than one split into a fitting and a held-back half (the rule until 2026-12-07): every
trajectory is scored, so the decision rests on twice the held-back rows, and each fit uses all but one trajectory,
so it is close to the one that is applied. On shapes16-cond W8A8 the offsets are tiny (mean |b| ~ 5e-4) and the
held-back error changed by 0.01-0.9% per group, so the old half-split decision moved with the CPU's rounding (4 of 8
groups kept on an AVX2-only CPU, 7 on AMX), while forcing every group on moved that row's FD ratio by only 0.017
(1.169 -> 1.152x FP on one graph; docs/quality/HISTORY.md).

Lowering: a :class:`TimestepOutputCorrection` node after the graph's output computes ``a[g(t)] y - b[g(t)]``
with ``g(t)`` = the group whose timestep interval holds ``t`` (boundaries half-way between adjacent groups), in
float after the last dequantize; checkpoints save it like any float tensor.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import torch
from torch import fx, nn

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.distributed import deal, sum_over_ranks, sum_tensor_over_ranks
from qdiff_ao.calibration.float_reference import FloatReference
from qdiff_ao.calibration.sampler_view import RowGroup, timestep_rows
from qdiff_ao.capture.devices import inputs_device, module_device, to_device
from qdiff_ao.capture.graph_state import update_graph_info
from qdiff_ao.capture.input_guards import is_input_guard
from qdiff_ao.passes.denoised_view import PREDICTION_TYPES, alpha_bar_at, rescale_x0_spread
from qdiff_ao.passes.output_fit import FEATURES, KINDS, fit_candidates, left_out_errors, row_moments
from qdiff_ao.passes.paired_trajectories import paired_z
from qdiff_ao.passes.sampler_runs import quantized_forward
from qdiff_ao.quantizers.simulation import output_tensor
from qdiff_ao.quantizers.timestep_grids import contiguous_groups, group_boundaries

__all__ = ["OUTPUT_CORRECTION", "TimestepOutputCorrection", "add_output_correction", "correct_output"]

logger = logging.getLogger(__name__)

OUTPUT_CORRECTION = "qdiff_output_correction"
"""Module name of the correction in the graph."""


class TimestepOutputCorrection(nn.Module):
    """``gain[g(t)] * y + input_gain[g(t)] * x - bias[g(t)]`` with ``g(t) = #{boundaries <= t}``
    (``torch.bucketize(t, boundaries, right=True)``) and ``x`` the UNet's input ``sample``; without gains
    (``gain=False``, the layout of checkpoints before gains existed) the first term is ``y``, without input gains
    (``input_gain=False``, the layout before they existed) the second is absent. With ``spread`` (the model's
    prediction type) the result ``y`` then has its denoised estimate's spread set, ``x0 -> m + s (x0 - m)`` with
    ``s = spread_gain[g(t)]``, ``m = spread_centre[g(t)]`` per channel
    (:func:`~qdiff_ao.passes.denoised_view.rescale_x0_spread`, ``alpha_bar`` from the ``alphas_cumprod`` buffer;
    fitted by :func:`~qdiff_ao.passes.prediction_spread.match_prediction_spread`).

    Buffers: ``boundaries`` ``(G - 1,)`` ascending timesteps, ``bias`` ``(G, C)``, ``gain`` ``(G, C)`` (ones
    where a group keeps no gain) when ``gain=True``, ``input_gain`` ``(G, C)`` (zeros where a group keeps none)
    when ``input_gain=True``; with ``spread``: ``spread_gain`` ``(G, C)`` (ones: no change), ``spread_centre``
    ``(G, C)`` and ``alphas_cumprod`` ``(num_train_timesteps,)``.
    """

    boundaries: torch.Tensor
    bias: torch.Tensor
    gain: torch.Tensor | None
    input_gain: torch.Tensor | None
    spread_gain: torch.Tensor | None
    spread_centre: torch.Tensor | None
    alphas_cumprod: torch.Tensor | None

    def __init__(self, num_groups: int, channels: int, gain: bool = False, input_gain: bool = False,
                 spread: str | None = None, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        if num_groups < 1 or channels < 1 or num_train_timesteps < 1:
            raise ValueError(f"need num_groups >= 1, channels >= 1 and num_train_timesteps >= 1, got {num_groups}, "
                             f"{channels}, {num_train_timesteps}")
        if spread is not None and spread not in PREDICTION_TYPES:
            raise ValueError(f"spread must be None or a prediction type {PREDICTION_TYPES}, got {spread!r}")
        self.prediction_type = spread
        self.register_buffer("boundaries", torch.zeros(num_groups - 1))
        self.register_buffer("bias", torch.zeros(num_groups, channels))
        self.register_buffer("gain", torch.ones(num_groups, channels) if gain else None)
        self.register_buffer("input_gain", torch.zeros(num_groups, channels) if input_gain else None)
        with_spread = spread is not None
        self.register_buffer("spread_gain", torch.ones(num_groups, channels) if with_spread else None)
        self.register_buffer("spread_centre", torch.zeros(num_groups, channels) if with_spread else None)
        self.register_buffer("alphas_cumprod", torch.ones(num_train_timesteps) if with_spread else None)

    def layout(self) -> dict[str, Any]:
        """The constructor arguments that rebuild this module's layout (checkpoints record them)."""
        return {"num_groups": int(self.bias.shape[0]), "channels": int(self.bias.shape[1]),
                "gain": self.gain is not None, "input_gain": self.input_gain is not None,
                "spread": self.prediction_type,
                "num_train_timesteps": int(self.alphas_cumprod.shape[0]) if self.alphas_cumprod is not None else 1000}

    def needs_sample(self) -> bool:
        """Whether forward reads the UNet's input ``sample``."""
        return self.input_gain is not None or self.spread_gain is not None

    def group_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """Group index of each timestep."""
        return torch.bucketize(timestep.reshape(-1).to(self.boundaries.dtype), self.boundaries, right=True)

    def forward(self, y: torch.Tensor, timestep: torch.Tensor, sample: torch.Tensor | None = None) -> torch.Tensor:
        g = self.group_of(timestep)
        shape = (g.shape[0], self.bias.shape[1], *([1] * (y.dim() - 2)))
        if self.needs_sample() and sample is None:
            raise ValueError("this output correction reads the UNet's input: call it with the input sample")
        if self.gain is not None:
            y = y * self.gain[g].view(shape)
        if self.input_gain is not None:
            y = y + self.input_gain[g].view(shape) * cast(torch.Tensor, sample)
        y = y - self.bias[g].view(shape)
        if self.spread_gain is not None and self.spread_centre is not None and self.alphas_cumprod is not None:
            a = alpha_bar_at(self.alphas_cumprod, timestep, y)
            y = rescale_x0_spread(y, cast(torch.Tensor, sample), a, self.spread_gain[g].view(shape),
                                  self.spread_centre[g].view(shape), cast(str, self.prediction_type))
        return y


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


def _input_node(gm: fx.GraphModule, name: str) -> fx.Node:
    """The graph input ``name`` (after its input guard, when it has one)."""
    for node in gm.graph.nodes:
        if node.op == "placeholder" and str(node.target) == name:
            guards = [u for u in node.users if is_input_guard(u)]
            return guards[0] if guards else node
    raise ValueError(f"the graph has no {name!r} input; the output correction needs the UNet's {name}")


def add_output_correction(gm: fx.GraphModule, num_groups: int, channels: int,
                          gain: bool = False, input_gain: bool = False, spread: str | None = None,
                          num_train_timesteps: int = 1000) -> TimestepOutputCorrection:
    """Insert an identity :class:`TimestepOutputCorrection` before the graph output (once); returns it.

    A graph that already has one keeps it when the layout matches; a request for ``spread`` on a correction
    without it replaces the module by one with the same buffers plus identity spread buffers (the graph node then
    also reads ``sample``). Any other mismatch raises ``ValueError``."""
    wanted = TimestepOutputCorrection(num_groups, channels, gain=gain, input_gain=input_gain, spread=spread,
                                      num_train_timesteps=num_train_timesteps).to(module_device(gm))
    if hasattr(gm, OUTPUT_CORRECTION):
        module = cast(TimestepOutputCorrection, getattr(gm, OUTPUT_CORRECTION))
        have, want = module.layout(), wanted.layout()
        if have == want:
            return module
        same = all(have[k] == want[k] for k in ("num_groups", "channels", "gain", "input_gain"))
        if not same or have["spread"]:
            raise ValueError(f"the graph already has an output correction with layout {have}, not {want}")
        for name in ("boundaries", "bias", "gain", "input_gain"):
            if getattr(module, name) is not None:
                getattr(wanted, name).copy_(getattr(module, name))
        gm.delete_submodule(OUTPUT_CORRECTION)
        gm.add_submodule(OUTPUT_CORRECTION, wanted)
        node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == OUTPUT_CORRECTION)
        node.args = (*node.args[:2], _input_node(gm, "sample"))
        gm.recompile()
        return wanted
    gm.add_submodule(OUTPUT_CORRECTION, wanted)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    value, rebuild = _output_value(out_node)
    args: tuple[fx.Node, ...] = (value, _input_node(gm, "timestep"))
    if wanted.needs_sample():
        args = (*args, _input_node(gm, "sample"))
    with gm.graph.inserting_before(out_node):
        corrected = gm.graph.call_module(OUTPUT_CORRECTION, args)
    out_node.args = (rebuild(corrected),)
    gm.recompile()
    return wanted


@torch.no_grad()
def correct_output(
    prepared: fx.GraphModule,
    calib: CalibrationSet,
    model: nn.Module,
    *,
    num_groups: int = 8,
    gain: bool = False,
    input_term: bool = False,
    batch_size: int = 32,
) -> fx.GraphModule:
    """Fit and insert the per-timestep-group output correction (see the module docstring); in place.

    Run after ``calibrate`` and ``reconstruct``, before ``convert``.

    Args:
        prepared: a calibrated output of ``qdiff_ao.prepare``.
        calib: calibration set with at least 2 trajectories per timestep (one left out, the others to fit).
        model: the float diffusers UNet the graph was traced from.
        num_groups: ``G``, at most the number of calibration timesteps.
        gain: also offer each group the gain-and-offset correction (default ``False``: the gains lowered the
            held-back error by a few percent but did not move the sample FD, see docs/DESIGN.md).
        input_term: also offer each group the linear estimate from the quantized output and the UNet's input,
            ``a y + c x - b`` (offered only when the output has the input's channels, as for a noise, sample or
            v prediction). At the first, high-noise steps the float output is nearly ``x`` itself and its small
            signal part sits below the quantization noise; the estimate shrinks the noisy part towards ``x``
            (``a < 1, c > 0``). Off by default: it brought shapes32 W4A8 samples ~20% closer to the float
            model's (image rel. L2) but did not lower the FD consistently, and on digits it made both slightly
            worse although the held-back eps error fell (docs/quality/HISTORY.md).
        batch_size: rows per forward.

    Returns:
        ``prepared``, with the report ``{"groups": [{"timesteps", "kept", "kind", "mse_before", "mse_after",
        "mse_offset", "mse_gain", "mse_input", "z", "num_trajectories", "mean_abs_offset", "mean_gain",
        "mean_input_gain"}], "boundaries", "num_groups_kept"}`` in ``graph_info(prepared).bias_correction``
        (``kind``: ``"none"``, ``"offset"``, ``"gain"`` or ``"input"``; ``mse_*``: mean squared error per output
        value with each trajectory left out of the fit, ``None`` for candidates not offered; ``z``: the chosen
        candidate's paired z against none over the trajectories, 0 when none is chosen).

    Raises:
        TypeError / ValueError: wrong argument types, ``num_groups < 1``, a set with fewer than 2 trajectories at
        some timestep, or a graph without a ``timestep`` input.
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
    parts = {float(t): timestep_rows(calib, t) for t in all_t}
    counts = [p.pairs if p.pairs is not None else len(p) for p in parts.values()]  # trajectories per timestep
    if min(counts) < 2:
        raise ValueError("correct_output needs >= 2 trajectories per timestep (one left out to check the others' "
                         "fit); collect the calibration set with samples_per_timestep >= 2")
    config = getattr(model, "config", None)
    # the input can stand in for the output only where they are the same kind of tensor (same channels)
    input_term = input_term and getattr(config, "in_channels", None) == getattr(config, "out_channels", None)
    offered = ("none", "offset") + (("gain",) if gain else ()) + (("input",) if input_term else ())
    device, dtype = module_device(model), next((p.dtype for p in model.parameters()), torch.float32)
    quantized = quantized_forward(prepared, model, device, dtype)  # with timestep groups: each row's group's grids
    timesteps = [float(t) for t in all_t]
    groups = contiguous_groups(timesteps, num_groups)
    group_of_t = {t: gi for gi, ts in enumerate(groups) for t in ts}

    # the float outputs the collector recorded, when the model reproduces them; else the model runs on every row
    float_outputs = FloatReference(
        calib, lambda inputs: output_tensor(model(**to_device(inputs, device))).to(inputs_device(inputs)),
        what="output correction")

    def outputs(group: RowGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        y_q, y_fp, x = [], [], []
        for start in range(0, len(group), batch_size):
            index = group.index[start:start + batch_size]
            inputs = calib._rows(index)
            y_q.append(quantized(inputs).to(inputs_device(inputs)))
            y_fp.append(float_outputs(index, inputs))
            x.append(inputs["sample"])
        q, f, xs = (group.sampler_output(torch.cat(v)) for v in (y_q, y_fp, x))
        # guidance rows of a pair share x_t, so a y + c x - b on both rows applies it to the guided output
        return q, f, (xs if input_term and xs.shape == q.shape else None)

    # Per group and trajectory (the row's position at its timestep: the collection records trajectory j at every
    # selected step), the channel moments of its outputs. On a process group each rank runs its share of the
    # timesteps and the moments are added up over the ranks.
    moments: dict[int, torch.Tensor] = {}
    for ti in deal(len(all_t)):
        t = float(all_t[ti])
        gi = group_of_t[t]
        rows = row_moments(*outputs(parts[t]))  # (P_t, C, 4, 4)
        if gi not in moments:
            moments[gi] = torch.zeros(max(counts), *rows.shape[1:], dtype=torch.float64)
        moments[gi][: rows.shape[0]] += rows
    # every rank with rows knows the output's channel count C; a rank without rows learns it here
    have, total = sum_over_ranks([float(bool(moments)), float(next((v.shape[1] for v in moments.values()), 0))])
    channels = round(total / have)
    zero = torch.zeros(max(counts), channels, FEATURES, FEATURES, dtype=torch.float64)
    per_trajectory = sum_tensor_over_ranks(torch.stack([moments.get(g, zero) for g in range(len(groups))]))
    bias = torch.zeros(len(groups), channels, dtype=torch.float64)
    gains = torch.ones(len(groups), channels, dtype=torch.float64)
    input_gains = torch.zeros(len(groups), channels, dtype=torch.float64)
    report_groups = []
    for gi, ts in enumerate(groups):
        errors, values = left_out_errors(per_trajectory[gi], offered)
        used = errors[0].isfinite()  # trajectories with rows in this group
        mse = {kind: float(errors[i, used].sum() / values) for i, kind in enumerate(KINDS) if kind in offered}
        kind = min(offered, key=lambda k: mse[k])  # min keeps the first of equals: "none" wins ties
        z = paired_z(errors[0, used], errors[KINDS.index(kind), used])[1] if kind != "none" else 0.0
        if kind != "none":
            a_all, c_all, b_all = fit_candidates(per_trajectory[gi].sum(0), (kind,))[kind]
            gains[gi], input_gains[gi], bias[gi] = a_all, c_all, b_all
        report_groups.append({"timesteps": ts, "kept": kind != "none", "kind": kind, "mse_before": mse["none"],
                              "mse_after": mse[kind], "mse_offset": mse["offset"], "mse_gain": mse.get("gain"),
                              "mse_input": mse.get("input"), "z": z, "num_trajectories": int(used.sum()),
                              "mean_abs_offset": float(bias[gi].abs().mean()),
                              "mean_gain": float(gains[gi].mean()), "mean_input_gain": float(input_gains[gi].mean())})
    kinds = {g["kind"] for g in report_groups}
    # the module carries gains when they were offered (the layout of earlier checkpoints), input gains only where
    # some group keeps them (a graph without them keeps its inputs and the older checkpoint layout)
    with_gain, with_input = gain or "input" in kinds, "input" in kinds
    boundaries = group_boundaries(groups)
    module = add_output_correction(prepared, len(groups), channels, gain=with_gain, input_gain=with_input)
    module.boundaries.copy_(torch.tensor(boundaries, dtype=module.boundaries.dtype))
    module.bias.copy_(bias.to(module.bias.dtype))
    if module.gain is not None:
        module.gain.copy_(gains.to(module.gain.dtype))
    if module.input_gain is not None:
        module.input_gain.copy_(input_gains.to(module.input_gain.dtype))
    report = {"method": "timestep_groups", "boundaries": boundaries, "groups": report_groups,
              "num_groups_kept": sum(1 for g in report_groups if g["kept"]), "num_samples": len(calib)}
    update_graph_info(prepared, bias_correction=report)
    logger.info("output correction: %d of %d timestep groups kept (%s)", report["num_groups_kept"], len(groups),
                ", ".join(str(g["kind"]) for g in report_groups))
    return prepared
