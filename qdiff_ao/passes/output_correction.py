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
with ``y_q`` the quantized model's output (``sampler_runs.quantized_forward``: on the CPU the lowered INT8 model,
elsewhere the fake-quant simulation) and ``y_fp`` the float model's, both as the sampler uses them
(with classifier-free guidance, the guided combination ``u + s (c - u)`` of each trajectory's two rows: the
weights ``1 - s`` and ``s`` add up to 1, so applying ``a y - b`` to both rows applies it to the guided output).
Rows of every timestep are split by trajectory into a fitting half and a held-back half: each candidate is
fitted on the first and the one with the lowest mean squared error ``|y' - y_fp|^2`` on the second is chosen
(nothing wins ties), then re-estimated on all rows of the group: it never makes a group worse on held-back data.

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
from qdiff_ao.calibration.sampler_view import RowGroup, timestep_rows
from qdiff_ao.capture.devices import inputs_device, module_device, to_device
from qdiff_ao.capture.graph_state import update_graph_info
from qdiff_ao.capture.input_guards import is_input_guard
from qdiff_ao.passes.denoised_view import PREDICTION_TYPES, alpha_bar_at, rescale_x0_spread
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


_FEATURES = 4  # per channel: q (quantized output), x (the UNet input), f (float output), 1


def _channel_moments(y_q: torch.Tensor, y_fp: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """``(C, 4, 4)`` float64: per channel (dim 1) the sums of products ``sum z z^T`` of ``z = (q, x, f, 1)``
    over rows and positions (``x = 0`` where the input cannot serve as a regressor)."""
    q, f = y_q.double(), y_fp.double()
    xs = torch.zeros_like(q) if x is None else x.double()
    z = torch.stack([q, xs, f, torch.ones_like(q)])  # (4, N, C, ...)
    z = z.transpose(1, 2).reshape(_FEATURES, q.shape[1], -1)  # (4, C, M)
    return torch.einsum("icm,jcm->cij", z, z)


def _plane(moments: torch.Tensor, regressors: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares ``f ~ a q + c x + d`` per channel over the given regressors (0 = q, 1 = x), as ``(a, c, b)``
    of ``y' = a y + c x - b`` (``b = -d``), from centred moments. A regressor without variance (<= 1e-12 of its
    second moment, e.g. ``x = 0``) is left out with its neutral coefficient (``a = 1``, ``c = 0``) instead of
    getting an arbitrary one; collinear regressors get the minimum-norm solution."""
    n = moments[:, 3, 3]
    mean = moments[:, :3, 3] / n[:, None]  # (C, 3): q, x, f
    cov = moments[:, :3, :3] / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
    coef = torch.zeros(moments.shape[0], 2, dtype=moments.dtype)
    coef[:, 0] = 1.0
    for ch in range(moments.shape[0]):
        second = moments[ch, [0, 1], [0, 1]] / n[ch]
        keep = [i for i in regressors if cov[ch, i, i] > 1e-12 * second[i].clamp_min(1e-30)]
        if not keep:
            continue
        fixed = [i for i in (0, 1) if i not in keep]
        # the target minus the fixed terms: f - a q where q is left out with a = 1
        rhs = cov[ch, keep, 2] - sum(coef[ch, i] * cov[ch, keep, i] for i in fixed)
        sol = torch.linalg.lstsq(cov[ch][keep][:, keep], rhs.unsqueeze(1), driver="gelsd").solution[:, 0]
        coef[ch, keep] = sol
    offset = mean[:, 2] - coef[:, 0] * mean[:, 0] - coef[:, 1] * mean[:, 1]
    return coef[:, 0], coef[:, 1], -offset


def _fit(moments: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every candidate correction from the ``(C, 4, 4)`` moments, as ``(a, c, b)`` of ``y' = a y + c x - b``:

    * ``offset``: ``a = 1, c = 0, b = mean(q - f)``;
    * ``gain``: the least-squares line ``f ~ a q + d`` (``c = 0, b = -d``);
    * ``input``: the least-squares plane ``f ~ a q + c x + d`` (``b = -d``), i.e. the best linear estimate of
      the float output from the quantized output and the UNet's own input.
    """
    n = moments[:, 3, 3]
    ones, zeros = torch.ones_like(n), torch.zeros_like(n)
    return {"offset": (ones, zeros, (moments[:, 0, 3] - moments[:, 2, 3]) / n),
            "gain": _plane(moments, [0]), "input": _plane(moments, [0, 1])}


def _apply(fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor], y: torch.Tensor, x: torch.Tensor | None
           ) -> torch.Tensor:
    a, c, b = (_view(v, y) for v in fit)
    out = a * y - b
    return out if x is None else out + c * x


def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, *([1] * (like.dim() - 2)))


_KINDS = ("none", "offset", "gain", "input")


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
        calib: calibration set with at least 2 rows per timestep (one to fit, one to check).
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
            worse although the held-back eps error fell (README, quality).
        batch_size: rows per forward.

    Returns:
        ``prepared``, with the report ``{"groups": [{"timesteps", "kept", "kind", "mse_before", "mse_after",
        "mse_offset", "mse_gain", "mse_input", "mean_abs_offset", "mean_gain", "mean_input_gain"}], "boundaries",
        "num_groups_kept"}`` in ``graph_info(prepared).bias_correction`` (``kind``: ``"none"``, ``"offset"``,
        ``"gain"`` or ``"input"``; ``mse_*`` on the held-back rows, ``None`` for candidates not offered).

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
    config = getattr(model, "config", None)
    # the input can stand in for the output only where they are the same kind of tensor (same channels)
    input_term = input_term and getattr(config, "in_channels", None) == getattr(config, "out_channels", None)
    offered = ("none", "offset") + (("gain",) if gain else ()) + (("input",) if input_term else ())
    device, dtype = module_device(model), next((p.dtype for p in model.parameters()), torch.float32)
    quantized = quantized_forward(prepared, model, device, dtype)  # with timestep groups: each row's group's grids
    timesteps = [float(t) for t in calib.timesteps()]
    groups = contiguous_groups(timesteps, num_groups)
    group_of_t = {t: gi for gi, ts in enumerate(groups) for t in ts}

    def outputs(group: RowGroup) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        y_q, y_fp, x = [], [], []
        for start in range(0, len(group), batch_size):
            inputs = calib._rows(group.index[start:start + batch_size])
            y_q.append(quantized(inputs).to(inputs_device(inputs)))
            y_fp.append(output_tensor(model(**to_device(inputs, device))).to(inputs_device(inputs)))
            x.append(inputs["sample"])
        q, f, xs = (group.sampler_output(torch.cat(v)) for v in (y_q, y_fp, x))
        # guidance rows of a pair share x_t, so a y + c x - b on both rows applies it to the guided output
        return q, f, (xs if input_term and xs.shape == q.shape else None)

    # Per group: channel moments of the fitting half and of all rows, and the held-back outputs. On a process
    # group each rank runs its share of the timesteps and the moments are added up over the ranks.
    fit_mom: dict[int, torch.Tensor] = {}
    all_mom: dict[int, torch.Tensor] = {}
    held: list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]] = [[] for _ in groups]
    for ti in deal(len(all_t)):
        t = all_t[ti]
        gi = group_of_t[float(t)]
        for part, rows in zip(("fit", "held"), halves[float(t)], strict=True):
            y_q, y_fp, x = outputs(rows)
            m = _channel_moments(y_q, y_fp, x)
            all_mom[gi] = all_mom[gi] + m if gi in all_mom else m
            if part == "fit":
                fit_mom[gi] = fit_mom[gi] + m if gi in fit_mom else m
            else:
                held[gi].append((y_q, y_fp, x))
    # every rank with rows knows the output's channel count C; a rank without rows learns it here
    have, total = sum_over_ranks([float(bool(all_mom)), float(next((v.shape[0] for v in all_mom.values()), 0))])
    channels = round(total / have)

    def over_ranks(moments: dict[int, torch.Tensor]) -> torch.Tensor:
        zero = torch.zeros(channels, _FEATURES, _FEATURES, dtype=torch.float64)
        return sum_tensor_over_ranks(torch.stack([moments.get(g, zero) for g in range(len(groups))]))

    fit_total, all_total = over_ranks(fit_mom), over_ranks(all_mom)
    # held-back squared error of each candidate (rows of _KINDS, then the value count): sums over this rank's
    # rows, then over ranks
    held_sq = torch.zeros(len(_KINDS) + 1, len(groups), dtype=torch.float64)
    for gi in range(len(groups)):
        fits = _fit(fit_total[gi])
        for q, f, x in held[gi]:
            y_q, y_fp = q.double(), f.double()
            xd = None if x is None else x.double()
            held_sq[0, gi] += (y_q - y_fp).pow(2).sum()
            for i, kind in enumerate(_KINDS[1:], start=1):
                if kind in offered:  # a candidate is only scored when it is offered
                    held_sq[i, gi] += (_apply(fits[kind], y_q, xd) - y_fp).pow(2).sum()
            held_sq[-1, gi] += y_q.numel()
    held_sq = sum_tensor_over_ranks(held_sq)
    bias = torch.zeros(len(groups), channels, dtype=torch.float64)
    gains = torch.ones(len(groups), channels, dtype=torch.float64)
    input_gains = torch.zeros(len(groups), channels, dtype=torch.float64)
    report_groups = []
    for gi, ts in enumerate(groups):
        mse = {kind: float(held_sq[i, gi] / held_sq[-1, gi]) for i, kind in enumerate(_KINDS) if kind in offered}
        kind = min(offered, key=lambda k: mse[k])  # min keeps the first of equals: "none" wins ties
        if kind != "none":
            a_all, c_all, b_all = _fit(all_total[gi])[kind]
            gains[gi], input_gains[gi], bias[gi] = a_all, c_all, b_all
        report_groups.append({"timesteps": ts, "kept": kind != "none", "kind": kind, "mse_before": mse["none"],
                              "mse_after": mse[kind], "mse_offset": mse["offset"], "mse_gain": mse.get("gain"),
                              "mse_input": mse.get("input"), "mean_abs_offset": float(bias[gi].abs().mean()),
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
