"""Which quantizer hurts, and at which denoising steps: the error each quantizer causes alone.

In the fake-quant simulation of a calibrated prepared graph every quantizer is switched off (the float
model) except one, ``q``; on calibration rows of each calibration timestep ``t`` the report measures

    e_q(t) = || f_q(x_t, t) - f_fp(x_t, t) ||_F / || f_fp(x_t, t) ||_F          (norms over the rows of t)

where ``f`` is the UNet output (the noise prediction) as the sampler uses it -- with classifier-free guidance
the guided combination of each trajectory's two rows (:mod:`qdiff_ao.calibration.sampler_view`). ``e_all(t)`` is
the same with every quantizer on. A quantizer with a large ``e_q`` at some steps is one the model cannot afford
at those steps: e.g. the input quantizer of a UNet trained with linear betas, whose 8-bit grid (set by the noisy
early steps, |x_t| up to ~4) is coarser than the whole noise left in ``x_t`` near ``t = 0`` (amplitude ~0.01):
at the last steps the quantized model cannot see the noise it has to predict.

One quantizer at a time isolates each effect (errors of many small quantizers add roughly in quadrature; the
ranking is what matters). Weights are measured with their current rounding (after reconstruction, AdaRound's).

    report = qdiff_ao.report.sensitivity(prepared, calib)
    print(report.format_table())
    report.plot("sensitivity.png")          # heat map, quantizer x timestep
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from tqdm.auto import tqdm

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.sampler_view import TARGETS, ErrorProbe, guidance_scale
from qdiff_ao.capture.input_guards import is_input_guard
from qdiff_ao.quantizers.qparams import is_quantized_layer
from qdiff_ao.quantizers.simulation import Simulation, build_simulation, output_tensor

__all__ = ["QuantizerSensitivity", "SensitivityReport", "sensitivity"]

logger = logging.getLogger(__name__)

_KINDS = ("activation", "weight")


@dataclass(frozen=True)
class QuantizerSensitivity:
    """One quantizer's row of the report.

    Attributes:
        name: the prepared graph's module name (an activation observer, or a quantized layer for weights).
        kind: ``"activation"`` or ``"weight"``.
        value: what it quantizes (the observed graph value, or the layer itself).
        layers: the quantized Conv2d/Linear modules whose float fallback removes this quantizer: for an
            activation, the layer producing it and the layers reading it (empty when only other ops touch it,
            e.g. attention matmuls); for a weight, its layer.
        errors: ``e_q(t)`` per timestep of :attr:`SensitivityReport.timesteps`.
    """

    name: str
    kind: str
    value: str
    layers: tuple[str, ...]
    errors: tuple[float, ...]

    @property
    def worst(self) -> float:
        """``max_t e_q(t)``."""
        return max(self.errors)

    @property
    def mean(self) -> float:
        """``mean_t e_q(t)``."""
        return sum(self.errors) / len(self.errors)


@dataclass(frozen=True)
class SensitivityReport:
    """Per-quantizer errors per timestep (see the module docstring), most harmful first."""

    timesteps: tuple[float, ...]
    rows: tuple[QuantizerSensitivity, ...]
    all_on: tuple[float, ...]
    rows_per_timestep: int
    target: str = "sampler"  # what the errors are of (see sensitivity's ``target``)

    def ranked(self, kind: str | None = None) -> list[QuantizerSensitivity]:
        """Rows sorted by worst-step error, largest first (optionally one kind only)."""
        rows = [r for r in self.rows if kind is None or r.kind == kind]
        return sorted(rows, key=lambda r: -r.worst)

    def median_worst(self, kind: str = "activation") -> float:
        """Median over quantizers of ``max_t e_q(t)``: the typical quantizer's worst-step error."""
        worst = sorted(r.worst for r in self.rows if r.kind == kind)
        return worst[len(worst) // 2] if worst else 0.0

    def format_table(self, top: int = 10) -> str:
        """A ranked plain-text table: quantizer, kind, value, worst step error and where, mean error."""
        lines = [f"{'quantizer':<34} {'kind':<10} {'value':<34} {'worst':>7} {'at t':>6} {'mean':>7}"]
        for r in self.ranked()[:top]:
            at = self.timesteps[max(range(len(r.errors)), key=r.errors.__getitem__)]
            lines.append(f"{r.name[:34]:<34} {r.kind:<10} {r.value[:34]:<34} {r.worst:7.4f} {at:6g} {r.mean:7.4f}")
        lines.append(f"{'all quantizers on':<80} {max(self.all_on):7.4f} {'':>6} "
                     f"{sum(self.all_on) / len(self.all_on):7.4f}")
        return "\n".join(lines)

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        """JSON-ready form (ranked rows, optionally only the ``top`` first)."""
        rows = self.ranked()[:top] if top else self.ranked()
        return {
            "timesteps": list(self.timesteps),
            "rows_per_timestep": self.rows_per_timestep,
            "target": self.target,
            "all_on": list(self.all_on),
            "rows": [{"name": r.name, "kind": r.kind, "value": r.value, "layers": list(r.layers),
                      "worst": r.worst, "mean": r.mean, "errors": list(r.errors)} for r in rows],
        }

    def plot(self, path: str | os.PathLike[str], top: int = 24) -> None:
        """Save a heat map (PNG) of ``log10 e_q(t)``: the ``top`` most harmful quantizers x timestep."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.ranked()[:top]
        data = torch.tensor([r.errors for r in rows]).clamp_min(1e-6).log10()
        fig, ax = plt.subplots(figsize=(3.0 + 0.32 * len(self.timesteps), 1.4 + 0.26 * len(rows)))
        image = ax.imshow(data.numpy(), aspect="auto", cmap="magma")
        ax.set_yticks(range(len(rows)), [f"{r.value} ({r.kind[0]})"[:40] for r in rows], fontsize=7)
        ax.set_xticks(range(len(self.timesteps)), [f"{t:g}" for t in self.timesteps], fontsize=7, rotation=90)
        ax.set_xlabel("timestep t (sampling runs right to left)")
        what = "guidance signal y_c - y_u" if self.target == "guidance" else "eps"
        ax.set_title(f"{what} error caused by each quantizer alone (log10 relative error)", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.04)
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)


def _observed_value(node: fx.Node) -> str:
    arg = node.args[0] if node.args else node
    if isinstance(arg, fx.Node) and is_input_guard(arg):
        arg = arg.args[0]
    if not isinstance(arg, fx.Node):
        return str(node.target)
    return str(arg.target if arg.op == "call_module" else arg.name)


def _is_layer_node(prepared: fx.GraphModule, node: object) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_module"
            and is_quantized_layer(prepared.get_submodule(str(node.target))))


def _layers_of(prepared: fx.GraphModule, node: fx.Node) -> tuple[str, ...]:
    """The quantized layers whose float fallback removes activation quantizer ``node``: the layer producing the
    quantized value (its output quantizer) and the layers reading it (their input quantizer)."""
    producer = node.args[0] if node.args else None
    layers = {str(u.target) for u in node.users if _is_layer_node(prepared, u)}
    if _is_layer_node(prepared, producer):
        layers.add(str(producer.target))  # type: ignore[union-attr]
    return tuple(sorted(layers))


_output_tensor = output_tensor  # the name passes and benchmarks import


def _switch_all(sim: Simulation, on: bool) -> None:
    for act in sim.acts.values():
        act.enabled = on
    for layer in sim.layers.values():
        layer.enabled = on


@torch.no_grad()
def sensitivity(
    prepared: fx.GraphModule,
    calib: CalibrationSet,
    *,
    rows_per_timestep: int = 4,
    kinds: Iterable[str] = _KINDS,
    batch_size: int = 64,
    progress: bool = False,
    target: str = "sampler",
) -> SensitivityReport:
    """Measure ``e_q(t)`` for every activation and/or weight quantizer of a calibrated prepared graph.

    Costs one forward of ``rows_per_timestep x (number of timesteps)`` rows per quantizer; on a process group
    each rank runs the rows of its share of the timesteps and every rank returns the same report.

    Args:
        prepared: the calibrated (possibly reconstructed) output of ``qdiff_ao.prepare``; not modified.
        calib: the calibration set (its first ``rows_per_timestep`` rows -- guidance pairs, if it records them --
            of every timestep are used).
        rows_per_timestep: rows (or guidance pairs) per timestep (>= 1).
        kinds: ``"activation"`` and/or ``"weight"``.
        batch_size: rows per forward.
        progress: show a tqdm bar.
        target: ``"sampler"``: errors of the output the sampler steps with (guided, with guidance);
            ``"guidance"``: errors of the guidance signal ``g = y_c - y_u`` alone, ``|g_q - g_fp| / |g_fp|`` (what
            carries the class or prompt; needs a set with guidance pairs).

    Raises:
        TypeError: wrong argument types. ValueError: bad ``rows_per_timestep`` / ``kinds`` / ``batch_size`` /
        ``target``, ``target="guidance"`` on a set without guidance pairs, or an uncalibrated graph.
    """
    if not isinstance(prepared, fx.GraphModule):
        raise TypeError(f"prepared must be the GraphModule returned by qdiff_ao.prepare, got {type(prepared).__name__}")
    if not isinstance(calib, CalibrationSet):
        raise TypeError(f"calib must be a qdiff_ao.CalibrationSet, got {type(calib).__name__}")
    kinds = tuple(kinds)
    if not kinds or any(k not in _KINDS for k in kinds):
        raise ValueError(f"kinds must be a non-empty subset of {_KINDS}, got {kinds}")
    for name, value in (("rows_per_timestep", rows_per_timestep), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if target == "guidance" and guidance_scale(calib) is None:
        raise ValueError("target='guidance' measures y_c - y_u of guidance pairs, and this calibration set records "
                         "none: collect it from a guided sampler (negative_encoder_hidden_states=, guidance_scale=) "
                         "or use target='sampler'")
    sim = build_simulation(prepared)
    sim.gm.eval()
    probe = ErrorProbe(calib, rows_per_timestep)

    def run() -> torch.Tensor | None:
        return probe.outputs(sim.run, batch_size)  # with timestep groups, each row runs with its group's grids

    with sim.full_precision():
        reference = run()
    all_on = probe.errors(run(), reference, target)
    nodes = {str(n.target): n for n in prepared.graph.nodes if n.op == "call_module"}
    todo: list[tuple[str, str]] = []
    if "activation" in kinds:
        todo += [(name, "activation") for name, act in sim.acts.items() if act.quant is not None]
    if "weight" in kinds:
        todo += [(name, "weight") for name in sim.layers]
    rows = []
    _switch_all(sim, False)
    try:
        for name, kind in tqdm(todo, desc="sensitivity", disable=not progress, leave=False):
            switch = sim.acts[name] if kind == "activation" else sim.layers[name]
            switch.enabled = True
            try:
                errors = probe.errors(run(), reference, target)
            finally:
                switch.enabled = False
            node = nodes[name]
            observed = _observed_value(node) if kind == "activation" else name
            layers = _layers_of(prepared, node) if kind == "activation" else (name,)
            rows.append(QuantizerSensitivity(name, kind, observed, layers, errors))
    finally:
        _switch_all(sim, True)
    report = SensitivityReport(tuple(probe.timesteps), tuple(rows), all_on, rows_per_timestep, target)
    logger.info("sensitivity of %d quantizers over %d timesteps; worst: %s", len(rows), len(probe.timesteps),
                [(r.value, round(r.worst, 4)) for r in report.ranked()[:3]])
    return report
