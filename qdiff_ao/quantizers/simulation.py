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

Timestep groups: when the prepared graph's info carries per-group activation grids
(:class:`~qdiff_ao.quantizers.timestep_grids.TimestepGroupGrids`, from ``passes.choose_timestep_groups``), the
activation quantizers they name use group ``g``'s grid inside ``with sim.state.in_group(g):``, and
:meth:`Simulation.run` splits a batch by the group of each row's timestep, as the lowered model dispatches.

Weight and activation qparams come from :mod:`qdiff_ao.quantizers.qparams` (what ``convert_fx`` computes).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.capture.devices import inputs_device, module_device, to_device
from qdiff_ao.capture.graph_state import graph_info, has_graph_info
from qdiff_ao.capture.row_parts import run_by_part
from qdiff_ao.quantizers.adaround import AdaRoundWeight, LearnedStepQuant
from qdiff_ao.quantizers.fixed import FixedFakeQuantize
from qdiff_ao.quantizers.float_tail import FloatTail
from qdiff_ao.quantizers.qparams import activation_qparams, is_quantized_layer, weight_qparams
from qdiff_ao.quantizers.timestep_grids import TimestepGroupGrids

__all__ = ["SimActQuant", "SimLayer", "SimState", "Simulation", "build_simulation", "output_tensor"]


def output_tensor(out: Any) -> torch.Tensor:
    """The sample tensor of a UNet graph's output (a tensor, a ``{"sample": ...}`` dict, a tuple, an output class)."""
    while not isinstance(out, torch.Tensor):
        if isinstance(out, dict):
            out = out.get("sample", next(iter(out.values())))
        elif isinstance(out, (tuple, list)):
            out = out[0]
        elif hasattr(out, "sample"):
            out = out.sample
        else:
            raise TypeError(f"cannot find the output tensor in a {type(out).__name__}")
    return out


class SimState:
    """Whether the simulation currently computes the float model; changed only by :meth:`precision`."""

    def __init__(self) -> None:
        self._fp = False
        self._group: int | None = None
        self._float_activations = False

    @property
    def fp(self) -> bool:
        return self._fp

    @property
    def group(self) -> int | None:
        """The timestep group whose activation grids apply (``None``: the single grid)."""
        return self._group

    @contextlib.contextmanager
    def in_group(self, group: int | None) -> Iterator[None]:
        """Use timestep group ``group``'s activation grids (``None``: the single grid), restoring after."""
        previous, self._group = self._group, group
        try:
            yield
        finally:
            self._group = previous

    @property
    def float_activations(self) -> bool:
        """Whether every activation quantizer is bypassed (the float tail's rows; weights stay quantized)."""
        return self._float_activations

    @contextlib.contextmanager
    def in_float_tail(self, on: bool = True) -> Iterator[None]:
        """Run with float activations (``on``) as the float tail does, restoring after."""
        previous, self._float_activations = self._float_activations, on
        try:
            yield
        finally:
            self._float_activations = previous

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
        enabled: ``False`` runs ``layer.weight`` as it is: the float weight before reconstruction, but the baked
            W_hat after it (a float-weight diagnostic of a reconstructed graph must reload the float weights).
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
        self._cached: tuple[tuple[str, list[tuple[torch.Tensor, int]]], torch.Tensor] | None = None

    @property
    def state(self) -> SimState:
        return self._state[0]

    def _inputs_of_quantized_weight(self) -> tuple[str, list[tuple[torch.Tensor, int]]]:
        """What W_hat depends on: the mode, and each tensor with its in-place version (the key holds the tensors
        themselves, so a replaced tensor is never mistaken for a new one at the same address)."""
        q = self.quant
        return q.mode, [(t, t._version) for t in (self.layer.weight, q.v, q.w_floor, q.scale, q.zero_point)]

    def _cache_valid(self, key: tuple[str, list[tuple[torch.Tensor, int]]]) -> bool:
        if self._cached is None or self._cached[0][0] != key[0]:
            return False
        return all(a is b and va == vb for (a, va), (b, vb) in zip(self._cached[0][1], key[1]))

    def quantized_weight(self) -> torch.Tensor:
        """W_hat of the quantizer's current mode. Except for soft rounding under training it is computed once and
        reused until the float weight, the rounding variables, the qparams or the mode change (sampler runs of the
        simulation called the weight quantizer at every step: ~15% of a forward of the CIFAR-size UNet at batch
        32)."""
        weight = self.layer.weight.detach()
        # only soft rounding carries a gradient to V; hard and nearest W_hat are constants even while the
        # activation step sizes train (reconstruction's second phase reuses them at every step)
        if self.quant.mode == "soft" and torch.is_grad_enabled() and self.quant.v.requires_grad:
            self._cached = None  # training: the rounding changes at every step
            return self.quant(weight)
        key = self._inputs_of_quantized_weight()
        cached = self._cached
        if cached is None or not self._cache_valid(key):
            cached = self._cached = (key, self.quant(weight).detach())
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.layer.weight
        bias = self.layer.bias
        if not self.state.fp and self.enabled:
            weight = self.quantized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, weight, bias)
        return F.linear(x, weight, bias)


class SimActQuant(nn.Module):
    """An activation observer of the prepared graph as a fake-quant (identity in fp mode or when disabled)."""

    def __init__(self, quant: nn.Module | None, state: SimState, observer: nn.Module) -> None:
        super().__init__()
        self.quant = quant
        self.enabled = True
        self.group_grids: tuple[tuple[float, int], ...] | None = None  # per timestep group (s, z), if any
        self.observer_repr = type(observer).__name__
        self._state = [state]

    @property
    def state(self) -> SimState:
        return self._state[0]

    @property
    def learnable(self) -> bool:
        return isinstance(self.quant, LearnedStepQuant) and self.quant.learnable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is None or self.state.fp or not self.enabled or self.state.float_activations:
            return x
        group = self.state.group
        if group is not None and self.group_grids is not None:
            scale, zero_point = self.group_grids[group]
            q = cast(LearnedStepQuant, self.quant)
            if torch.is_grad_enabled() and x.requires_grad:
                return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, q.quant_min, q.quant_max)
            return fake_quantize_in_place(x, scale, zero_point, q.quant_min, q.quant_max)
        return self.quant(x)


def fake_quantize_in_place(x: torch.Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int
                           ) -> torch.Tensor:
    """``torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)``, the same values, in one
    new buffer (no gradient):

        y = (clamp(round(x * inv) + z, quant_min, quant_max) - z) * s,   s = float32(scale), inv = float32(1 / s)

    Why: that kernel also writes a gradient mask and ran ~8x slower than these in-place steps on a 4M-element
    tensor (2 threads); the factors are float32, as in the kernel, so the roundings agree bit for bit (tested).
    """
    s = torch.tensor(scale, dtype=torch.float32)
    return (x * torch.reciprocal(s)).round_().add_(zero_point).clamp_(quant_min, quant_max).sub_(zero_point).mul_(s)


FIXED_STEP_ATTR = "qdiff_fixed_step"
"""Set to True on an activation observer whose calibrated step size reconstruction must keep (not learn): the
symmetric Q, K, V of ``passes.attention_operands``, where learning the steps cost shapes32 0.17-0.31x FP in FD
(keeping them: about half of that)."""


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
    learnable = qp.quant_max - qp.quant_min <= 255 and not getattr(observer, FIXED_STEP_ATTR, False)
    return LearnedStepQuant(qp.scale, qp.zero_point, qp.quant_min, qp.quant_max, learnable=learnable)


@dataclass
class Simulation:
    """The simulation GraphModule and its quantizers by prepared module name."""

    gm: fx.GraphModule
    state: SimState
    layers: dict[str, SimLayer] = field(default_factory=dict)
    acts: dict[str, SimActQuant] = field(default_factory=dict)
    groups: TimestepGroupGrids | None = None
    tail: FloatTail | None = None

    def run(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The output tensor of the simulation on ``inputs`` (graph inputs by name; extra names are ignored).

        With timestep groups, the rows are split by the group of their timestep and each part runs with its
        group's grids (rows are independent in a UNet), then put back in order; with a float tail, its rows run
        with float activations (as the lowered model runs them). The inputs move to the graph's device; the output
        comes back on the inputs' device.
        """
        names = [str(n.target) for n in self.gm.graph.nodes if n.op == "placeholder"]
        args = to_device({k: inputs[k] for k in names if k in inputs}, module_device(self.gm))
        return self._run(args).to(inputs_device(inputs))

    def _run(self, args: dict[str, Any]) -> torch.Tensor:
        if (self.groups is None and self.tail is None) or "timestep" not in args:
            return output_tensor(self.gm(**args))
        t = args["timestep"]
        # part of each row: -1 for the float tail, else its timestep group (0 without groups)
        if self.groups is not None:
            part = self.groups.group_of(t)
        else:
            part = torch.zeros(t.numel(), dtype=torch.long, device=t.device)
        if self.tail is not None:
            part = torch.where(self.tail.holds(t).to(part.device), torch.full_like(part, -1), part)
        return run_by_part(args, part, self._run_part)

    def _run_part(self, part: int, args: dict[str, Any]) -> torch.Tensor:
        if part < 0:
            with self.state.in_float_tail():
                return output_tensor(self.gm(**args))
        with self.state.in_group(part if self.groups is not None else None):
            return output_tensor(self.gm(**args))

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
    device = module_device(prepared)
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
    groups = graph_info(prepared).timestep_groups if has_graph_info(prepared) else None
    if isinstance(groups, TimestepGroupGrids) and groups.grids:
        for name, grids in groups.grids.items():
            act = sim.acts.get(name)
            if act is None or not isinstance(act.quant, LearnedStepQuant):
                raise ValueError(f"the timestep group grids name {name!r}, which is not a per-tensor activation "
                                 "quantizer of this graph; choose the groups again on this graph")
            act.group_grids = tuple(grids)
        sim.groups = groups
    tail = graph_info(prepared).float_tail if has_graph_info(prepared) else None
    if isinstance(tail, FloatTail):
        sim.tail = tail
    return sim

