"""A fake-quant simulation of a prepared (observed) graph, for block reconstruction.

The simulation is a second GraphModule over a copy of the prepared graph that shares the prepared model's
leaf modules (no weights are copied), with two kinds of nodes swapped:

    prepared                                   simulation
    conv / linear (qconfig set)        ==>     SimLayer: the same module, weight through AdaRoundWeight
    activation observer                ==>     SimActQuant: LearnedStepQuant initialised from the observer's
                                               calculate_qparams() (identity for float placeholders)

A shared :class:`SimState` switches the whole simulation between full precision (``fp = True``: every quantizer
is bypassed, so the graph computes the float model) and the quantized model; each quantizer also has its own
``enabled`` switch (activations off during the AdaRound phase of their block).

The weight qparams are those ``convert_fx`` would compute: ``module.qconfig.weight()`` observing the weight.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TypeGuard, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdiff_ao._compat import ObserverBase, PlaceholderObserver, QConfig
from qdiff_ao.passes._adaround import AdaRoundWeight, LearnedStepQuant
from qdiff_ao.passes.observe_softmax import FixedFakeQuantize
from qdiff_ao.primitives import fake_quant

__all__ = ["SimActQuant", "SimLayer", "SimState", "Simulation", "build_simulation", "is_quantized_layer"]

_QUANT_DTYPES = (torch.quint8, torch.qint8, torch.qint32)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)


@dataclass
class SimState:
    """Switch shared by every quantizer of one simulation: ``fp`` bypasses all of them."""

    fp: bool = False


def is_quantized_layer(module: nn.Module) -> TypeGuard[nn.Conv2d | nn.Linear]:
    """A Conv2d / Linear that convert_fx will quantize (it carries a qconfig with a quantized weight)."""
    qconfig = getattr(module, "qconfig", None)
    if type(module) not in (nn.Conv2d, nn.Linear) or qconfig is None or qconfig.weight is None:
        return False
    return qconfig.weight().dtype in _QUANT_DTYPES


class SimLayer(nn.Module):
    """A quantized Conv2d / Linear of the simulation: y = layer(x) with W replaced by AdaRound's W_hat.

    Attributes:
        layer: the prepared model's module (shared; its float weight is only changed by the final bake).
        quant: the :class:`AdaRoundWeight` holding the weight qparams and rounding variables.
        weight_observer: the observer whose qparams ``quant`` uses (for freezing them later).
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, state: SimState) -> None:
        super().__init__()
        obs = cast(QConfig, layer.qconfig).weight()  # set by prepare_fx (see is_quantized_layer)
        obs(layer.weight.detach())
        scale, zero_point = obs.calculate_qparams()
        per_channel = getattr(obs, "qscheme", None) in _PER_CHANNEL
        ch_axis = int(getattr(obs, "ch_axis", 0)) if per_channel else 0
        if not per_channel:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        self.layer = layer
        self.weight_observer = obs
        quant = AdaRoundWeight(scale, zero_point, obs.quant_min, obs.quant_max, ch_axis=ch_axis)
        self.quant = quant.to(layer.weight.device)
        self._state = [state]  # a list keeps the dataclass out of nn.Module's attribute handling

    @property
    def state(self) -> SimState:
        return self._state[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.layer.weight
        bias = self.layer.bias
        if not self.state.fp:
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


class _FixedChannelQuant(nn.Module):
    """Fixed per-channel activation fake-quant (observers with per-channel qparams are not learned)."""

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, ch_axis: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().float())
        self.register_buffer("zero_point", zero_point.detach().clone())
        self.qmin, self.qmax, self.ch_axis = qmin, qmax, ch_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax, self.ch_axis)


def _act_quant(observer: nn.Module, name: str) -> nn.Module | None:
    """The fake-quant standing in for ``observer`` (None: the observer keeps the tensor in float)."""
    if not isinstance(observer, ObserverBase):
        return copy.deepcopy(observer)  # e.g. a FixedFakeQuantize already frozen by lowering
    if isinstance(observer, PlaceholderObserver) or getattr(observer, "dtype", None) not in _QUANT_DTYPES:
        return None
    try:
        scale, zero_point = observer.calculate_qparams()
    except RuntimeError as err:
        raise ValueError(
            f"activation observer {name!r} has no qparams ({err}); run qdiff_ao.calibrate(prepared, calib) on "
            "the prepared model before reconstruct"
        ) from None
    qmin, qmax = int(cast(int, observer.quant_min)), int(cast(int, observer.quant_max))
    if scale.numel() != 1:
        return _FixedChannelQuant(scale, zero_point, qmin, qmax, int(getattr(observer, "ch_axis", 1)))
    # Codes wider than 8 bits (16-bit softmax) have no integer kernel and are frozen by lowering: keep fixed.
    return LearnedStepQuant(scale, zero_point, qmin, qmax, learnable=qmax - qmin <= 255)


@dataclass
class Simulation:
    """The simulation GraphModule and its quantizers by prepared module name."""

    gm: fx.GraphModule
    state: SimState
    layers: dict[str, SimLayer] = field(default_factory=dict)
    acts: dict[str, SimActQuant] = field(default_factory=dict)

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

