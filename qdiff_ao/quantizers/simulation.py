"""A fake-quant simulation of a prepared (observed) graph, for block reconstruction.

The simulation is a second GraphModule over a copy of the prepared graph that shares the prepared model's
leaf modules (no weights are copied), with two kinds of nodes swapped:

    prepared                                   simulation
    conv / linear (qconfig set)        ==>     SimLayer: the same module, weight through AdaRoundWeight
    activation observer                ==>     SimActQuant: LearnedStepQuant initialised from the observer's
                                               calculate_qparams() (identity for float placeholders)

The simulation computes the quantized model; inside ``with sim.full_precision():`` every quantizer is bypassed
and the same graph computes the float model (the switch is a :class:`SimState` shared by the simulation's
quantizers, readable by them and changed only by that context manager). Each activation quantizer and each weight
quantizer also has its own ``enabled`` switch (activations off during the AdaRound phase of their block; one
quantizer at a time in the sensitivity report).

Weight and activation qparams come from :mod:`qdiff_ao.quantizers.qparams` (what ``convert_fx`` computes).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.quantizers.adaround import AdaRoundWeight, LearnedStepQuant
from qdiff_ao.quantizers.fixed import FixedFakeQuantize
from qdiff_ao.quantizers.qparams import activation_qparams, is_quantized_layer, weight_qparams

__all__ = ["SimActQuant", "SimLayer", "SimState", "Simulation", "build_simulation"]

class SimState:
    """Whether the simulation currently computes the float model; changed only by :meth:`precision`."""

    def __init__(self) -> None:
        self._fp = False

    @property
    def fp(self) -> bool:
        return self._fp

    @contextlib.contextmanager
    def precision(self, fp: bool) -> Iterator[None]:
        """Run the block in full precision (``fp=True``) or quantized, restoring the previous mode after."""
        previous, self._fp = self._fp, fp
        try:
            yield
        finally:
            self._fp = previous


class SimLayer(nn.Module):
    """A quantized Conv2d / Linear of the simulation: y = layer(x) with W replaced by AdaRound's W_hat.

    Attributes:
        layer: the prepared model's module (shared; its float weight is only changed by the final bake).
        quant: the :class:`AdaRoundWeight` holding the weight qparams and rounding variables.
        weight_observer: the observer whose qparams ``quant`` uses (for freezing them later).
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, state: SimState) -> None:
        super().__init__()
        found = weight_qparams(layer)
        if found is None:
            raise ValueError(f"{type(layer).__name__} has no quantized weight qconfig (see is_quantized_layer)")
        obs, qp = found
        self.layer = layer
        self.weight_observer = obs
        quant = AdaRoundWeight(qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, ch_axis=qp.ch_axis or 0)
        self.quant = quant.to(layer.weight.device)
        self.enabled = True
        self._state = [state]  # a list keeps the dataclass out of nn.Module's attribute handling

    @property
    def state(self) -> SimState:
        return self._state[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.layer.weight
        bias = self.layer.bias
        if not self.state.fp and self.enabled:
            weight = self.quant(weight.detach())
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)


class SimActQuant(nn.Module):
    """An activation observer of the prepared graph as a fake-quant (identity in fp mode or when disabled)."""

    def __init__(self, quant: nn.Module | None, state: SimState, observer: nn.Module) -> None:
        super().__init__()
        self.quant = quant
        self.enabled = True
        self.observer_repr = type(observer).__name__
        self._state = [state]

    @property
    def state(self) -> SimState:
        return self._state[0]

    @property
    def learnable(self) -> bool:
        return isinstance(self.quant, LearnedStepQuant) and self.quant.learnable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None or self.state.fp or not self.enabled:
            return x
        return self.quant(x)


def _act_quant(observer: nn.Module, name: str) -> nn.Module | None:
    """The fake-quant standing in for ``observer`` (None: the observer keeps the tensor in float)."""
    if not isinstance(observer, ObserverBase):
        return copy.deepcopy(observer)  # e.g. a FixedFakeQuantize already frozen by lowering
    qp = activation_qparams(observer, name)
    if qp is None:
        return None
    if qp.ch_axis is not None:  # per-channel activation qparams are not learned
        return FixedFakeQuantize(qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, ch_axis=qp.ch_axis)
    # Codes wider than 8 bits (16-bit softmax) have no integer kernel and are frozen by lowering: keep fixed.
    return LearnedStepQuant(qp.scale, qp.zero_point, qp.quant_min, qp.quant_max,
                            learnable=qp.quant_max - qp.quant_min <= 255)


@dataclass
class Simulation:
    """The simulation GraphModule and its quantizers by prepared module name."""

    gm: fx.GraphModule
    state: SimState
    layers: dict[str, SimLayer] = field(default_factory=dict)
    acts: dict[str, SimActQuant] = field(default_factory=dict)

    def full_precision(self) -> contextlib.AbstractContextManager[None]:
        """``with sim.full_precision():`` the simulation computes the float model (every quantizer bypassed)."""
        return self.state.precision(True)

    def learnable_acts(self, names: list[str]) -> list[SimActQuant]:
        return [self.acts[n] for n in names if n in self.acts and self.acts[n].learnable]


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, leaf = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def build_simulation(prepared: fx.GraphModule) -> Simulation:
    """Build the fake-quant simulation of a calibrated prepared graph (the prepared graph is not modified).

    Quantizers live on the device of the prepared model's parameters.

    Raises:
        ValueError: if an activation observer has seen no data (calibrate first).
    """
    device = next((p.device for p in prepared.parameters()), torch.device("cpu"))
    graph = copy.deepcopy(prepared.graph)
    gm = fx.GraphModule(prepared, graph, class_name="ReconstructionSim")
    state = SimState()
    sim = Simulation(gm, state)
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        target = str(node.target)
        module = prepared.get_submodule(target)
        if target in sim.layers or target in sim.acts:
            continue
        if is_quantized_layer(module):
            sim.layers[target] = SimLayer(module, state)
            _set_submodule(gm, target, sim.layers[target])
        elif isinstance(module, (ObserverBase, FixedFakeQuantize)):
            sim.acts[target] = SimActQuant(_act_quant(module, target), state, module).to(device)
            _set_submodule(gm, target, sim.acts[target])
    return sim

