"""Keep in float the few layers whose quantizers the model cannot afford, found by measurement.

Some quantizers carry most of a UNet's quantization error at some denoising steps. The typical case: the
input quantizer of ``x_t`` in a model trained with linear betas -- near ``t = 0`` the noise left in ``x_t`` is
far below the step of the 8-bit grid that the noisy early steps set, so the quantized model cannot see the
noise it must predict (eps error ~1 at the last step, from that one quantizer). No layer is named here: the
pass measures, in the fake-quant simulation, the output error caused by quantizers switched on alone
(see :mod:`qdiff_ao.calibration.sensitivity`), with ``e_all(t)`` the error of the fully quantized model:

    harmful(q)  <=>  exists t:  e_q(t) > max( sqrt(share) * e_kind(q)(t),  min_error )

i.e. ``q`` alone causes more than ``share`` of its kind's error energy at some step where the error matters:
``e_weight(t) = e_all(t)``, and ``e_activation(t)`` is the error with every activation quantizer on and the
weights float. Why activations are weighed against the activations' error only: the pass runs before
reconstruction, when ``e_all`` at 4-bit weights is mostly the rounding error that AdaRound removes afterwards,
while what an activation quantizer loses no later step can recover. Against ``e_all``, shapes16-cond's input
quantizer (0.25 of a 0.58 error at ``t = 0``, share 0.19) passed at W4A8 but was kept float at W8A8 of the same
model; its samples then kept residual noise (docs/quality/HISTORY.md). Testing
every quantizer alone costs one forward each; instead quantizers are tested in groups (one kind per group,
contiguous in graph order; a group's error is at least about that of each member, since independent errors add in
quadrature) and only groups above their kind's threshold are split, halving down to single quantizers:
``~groups + 2 log2(n / groups)`` forwards per harmful quantizer instead of ``n``. Quantizers that no float layer
removes (the attention probabilities') are not candidates and stay on during the search.

The Conv2d/Linear layers whose float fallback removes a harmful quantizer (the layer producing the quantized
value and the layers reading it; for a weight quantizer its layer) are returned, most
harmful first, while their multiply-accumulates stay within ``max_macs_fraction`` of all quantized layers' --
the speed budget of the fallback. ``qdiff_ao.quantize`` puts them in ``QuantConfig.keep_float`` and prepares
again.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.distributed import sum_over_ranks
from qdiff_ao.calibration.sampler_view import ErrorProbe
from qdiff_ao.calibration.sensitivity import _layers_of, _observed_value
from qdiff_ao.quantizers.simulation import Simulation, build_simulation

__all__ = ["FallbackDecision", "choose_float_layers"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FallbackDecision:
    """What :func:`choose_float_layers` found.

    Attributes:
        layers: Conv2d/Linear module names to keep in float, most harmful first.
        harmful: one record per harmful quantizer: ``quantizer``, ``kind``, ``value``, ``layers``, ``worst_error``
            (its alone error at its worst step), ``at_timestep``, ``share`` (its share of its kind's error energy
            at that step: ``e_all`` for weights, ``e_activation`` for activations), ``kept`` (whether its layers
            fit the budget).
        macs_fraction: multiply-accumulates of ``layers`` / those of all quantized layers.
        all_on: ``e_all(t)`` per timestep; ``timesteps``: the timesteps measured.
        activations_on: ``e_activation(t)`` per timestep (every activation quantizer on, weights float).
        forwards: simulation forwards spent.
    """

    layers: tuple[str, ...]
    harmful: tuple[dict[str, Any], ...]
    macs_fraction: float
    all_on: tuple[float, ...]
    timesteps: tuple[float, ...]
    forwards: int
    activations_on: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "harmful": [dict(h) for h in self.harmful],
                "macs_fraction": self.macs_fraction, "all_on": list(self.all_on),
                "activations_on": list(self.activations_on), "timesteps": list(self.timesteps),
                "forwards": self.forwards}


def _layer_macs(sim: Simulation, run: Callable[[], object]) -> dict[str, int]:
    """Multiply-accumulates per quantized layer for the measured batch (from its output shape), summed over the
    ranks' batches (integers, exact)."""
    macs: dict[str, int] = {}
    handles = []
    for name, sim_layer in sim.layers.items():
        layer = sim_layer.layer

        def hook(_m: nn.Module, _i: Any, out: torch.Tensor, name: str = name,
                 layer: nn.Conv2d | nn.Linear = layer) -> None:
            if isinstance(layer, nn.Conv2d):
                per_output = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
            else:
                per_output = layer.in_features
            macs[name] = macs.get(name, 0) + out.numel() * per_output

        handles.append(sim_layer.register_forward_hook(hook))
    try:
        with sim.full_precision():
            run()
    finally:
        for h in handles:
            h.remove()
    names = list(sim.layers)
    return {name: int(total) for name, total in zip(names, sum_over_ranks([float(macs.get(n, 0)) for n in names]),
                                                    strict=True)}


def _share(error: float, total: float) -> float:
    """Error-energy share ``(e_q / e_kind)^2`` (infinite where the kind's error is 0)."""
    return (error / total) ** 2 if total > 0 else float("inf")


@torch.no_grad()
def choose_float_layers(
    prepared: fx.GraphModule,
    calib: CalibrationSet,
    *,
    share: float = 0.25,
    min_error: float = 0.01,
    max_macs_fraction: float = 0.05,
    rows_per_timestep: int = 2,
    groups: int = 16,
) -> FallbackDecision:
    """Find the layers to keep in float (see the module docstring); the prepared graph is not modified.

    Args:
        prepared: a calibrated output of ``qdiff_ao.prepare``.
        calib: its calibration set (``rows_per_timestep`` rows of every timestep are used; guidance pairs when the
            set records them, so errors are measured on the guided output the sampler uses).
        share: error-energy share above which one quantizer is harmful, in ``(0, 1]``.
        min_error: a quantizer causing a relative eps error below this at every step is never harmful (0.01:
            on the bundled and zoo models 0.02 missed the W8A8 output layer, whose 7-bit weights and 8-bit output
            carried ~0.012 + 0.010 of a 0.021 error at every step; 0.01 keeps it float for +0.1-0.4% of the MACs
            and changes no W4A8 decision).
        max_macs_fraction: budget: largest share of quantized multiply-accumulates moved to float, ``[0, 1]``.
        rows_per_timestep: calibration rows (or guidance pairs) per timestep in each measurement.
        groups: size of the first partition of the candidate quantizers (shared between the two kinds in
            proportion to their counts).

    Raises:
        ValueError: for out-of-range arguments or an uncalibrated graph.
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    if not 0 <= max_macs_fraction <= 1:
        raise ValueError(f"max_macs_fraction must be in [0, 1], got {max_macs_fraction}")
    if min_error < 0 or groups < 1 or rows_per_timestep < 1:
        raise ValueError(f"need min_error >= 0, groups >= 1, rows_per_timestep >= 1; got {min_error}, {groups}, "
                         f"{rows_per_timestep}")
    sim = build_simulation(prepared)
    sim.gm.eval()
    probe = ErrorProbe(calib, rows_per_timestep)
    forwards = 0

    def run() -> torch.Tensor | None:
        nonlocal forwards
        forwards += 1
        return probe.outputs(sim.run)  # Simulation.run: graph inputs only, on the graph's device, output back

    with sim.full_precision():
        reference = run()
    all_on = probe.errors(run(), reference)
    for layer in sim.layers.values():
        layer.enabled = False
    try:
        acts_on = probe.errors(run(), reference)
    finally:
        for layer in sim.layers.values():
            layer.enabled = True
    kind_errors = {"weight": all_on, "activation": acts_on}  # what each kind's share is measured against
    thresholds = {kind: [max(math.sqrt(share) * e, min_error) for e in errors] for kind, errors in kind_errors.items()}
    macs = _layer_macs(sim, run)
    nodes = {str(n.target): n for n in prepared.graph.nodes if n.op == "call_module"}
    # Candidates in graph order: activation quantizers touching quantized layers, and weight quantizers.
    candidates: list[tuple[str, str, tuple[str, ...]]] = []
    for target, node in nodes.items():
        if target in sim.acts and sim.acts[target].quant is not None:
            layers = _layers_of(prepared, node)
            if layers:
                candidates.append((target, "activation", layers))
        elif target in sim.layers:
            candidates.append((target, "weight", (target,)))
    switches = {name: (sim.acts[name] if kind == "activation" else sim.layers[name]) for name, kind, _ in candidates}

    def errors_of(members: list[tuple[str, str, tuple[str, ...]]]) -> tuple[float, ...]:
        for name, _, _ in members:
            switches[name].enabled = True
        try:
            return probe.errors(run(), reference)
        finally:
            for name, _, _ in members:
                switches[name].enabled = False

    def suspect(errors: tuple[float, ...], threshold: list[float]) -> bool:
        return any(e > thr for e, thr in zip(errors, threshold, strict=True))

    # Each kind is partitioned on its own, so a group is tested against its members' own threshold. A group of both
    # kinds could only be tested against the lower threshold, and before reconstruction one 4-bit weight quantizer
    # alone passes the activations' threshold without being harmful as a weight: on the CIFAR-size UNet (W4A8) the
    # mixed groups were then halved down to single quantizers, 178 forwards that found nothing.
    stack: list[list[tuple[str, str, tuple[str, ...]]]] = []
    for kind in ("weight", "activation"):
        of_kind = [c for c in candidates if c[1] == kind]
        if of_kind:
            size = math.ceil(len(of_kind) / max(1, round(groups * len(of_kind) / len(candidates))))
            stack += [of_kind[i:i + size] for i in range(0, len(of_kind), size)]
    found: list[tuple[float, int, tuple[str, str, tuple[str, ...]], tuple[float, ...]]] = []
    for s in list(switches.values()):
        s.enabled = False
    try:
        while stack:
            members = stack.pop()
            errors, threshold = errors_of(members), thresholds[members[0][1]]
            if not suspect(errors, threshold):
                continue
            if len(members) == 1:
                k = max(range(len(errors)), key=lambda i: errors[i] / threshold[i])
                found.append((errors[k] / threshold[k], k, members[0], errors))
            else:
                half = len(members) // 2
                stack += [members[:half], members[half:]]
    finally:
        for s in switches.values():
            s.enabled = True
    total_macs = sum(macs.values()) or 1
    chosen: list[str] = []
    harmful = []
    for _, k, (name, kind, layers), errors in sorted(found, key=lambda f: -f[0]):
        extra = [layer for layer in layers if layer not in chosen]
        fits = sum(macs.get(layer, 0) for layer in chosen + extra) / total_macs <= max_macs_fraction
        if fits:
            chosen += extra
        harmful.append({"quantizer": name, "kind": kind,
                        "value": _observed_value(nodes[name]) if kind == "activation" else name,
                        "layers": list(layers), "worst_error": errors[k], "at_timestep": float(probe.timesteps[k]),
                        "share": _share(errors[k], kind_errors[kind][k]), "kept": fits})
    decision = FallbackDecision(tuple(chosen), tuple(harmful), sum(macs.get(n, 0) for n in chosen) / total_macs,
                                all_on, tuple(probe.timesteps), forwards, tuple(acts_on))
    logger.info("precision fallback: %d harmful quantizers, keep %s in float (%.2f%% of MACs), %d forwards",
                len(harmful), list(chosen), 100 * decision.macs_fraction, forwards)
    return decision
