"""Block inputs and outputs cached over calibration samples, block by block, with a bounded footprint.

Reconstruction walks the blocks in order. Two "frontiers" hold, for the N cached samples, every tensor that a
later block still needs: one of the full-precision model (targets) and one of the model quantized so far
(inputs, "asym" reconstruction). A step evaluates the glue nodes the next block needs, runs the block, stores
its outputs and frees every tensor no later step reads:

    step k:  glue(k) ─► block k inputs ─► block k ─► outputs ─► free(k)

The plan is computed before any sample is cached, so its peak is known per sample:

    peak = max_k sum of the per-sample bytes alive during step k     (both frontiers: 2 * peak)

and the number of cached samples is ``N = min(len(calib), floor(max_cache_bytes / (2 * peak)))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import torch
from torch import fx

from qdiff_ao.passes.reconstruction.blocks import BlockSpec, Partition, partition_graph
from qdiff_ao.quantizers.simulation import SimState, Simulation

__all__ = ["Frontier", "Step", "peak_bytes_per_sample", "plan_cache", "plan_steps"]


@dataclass
class Step:
    """One block of the walk: the glue nodes to evaluate first and the tensors to free afterwards."""

    block: BlockSpec
    glue: list[str] = field(default_factory=list)
    free_after: list[str] = field(default_factory=list)


def plan_steps(part: Partition, placeholders: list[str]) -> list[Step]:
    """The walk over ``part.blocks``: glue evaluated lazily (only what a block needs), tensors freed after last use.

    Raises:
        RuntimeError: if a block reads a node of a block that comes later (an internal ordering error).
    """
    computed = set(placeholders)
    steps: list[Step] = []
    for spec in part.blocks:
        step = Step(spec)
        for name in spec.inputs:
            stack: list[tuple[str, bool]] = [(name, False)]
            while stack:
                node, expanded = stack.pop()
                if node in computed:
                    continue
                if part.unit.get(node) is not None:
                    raise RuntimeError(f"block {spec.name!r} needs {node!r} of block {part.unit[node]!r}, not run yet")
                if expanded:
                    computed.add(node)
                    step.glue.append(node)
                else:
                    stack.append((node, True))
                    stack.extend((d, False) for d in part.deps[node] if d not in computed)
        computed.update(spec.outputs)
        steps.append(step)
    produced: dict[str, int] = {p: 0 for p in placeholders}
    last: dict[str, int] = {}
    for i, step in enumerate(steps):
        for g in step.glue:
            produced[g] = i
            for d in part.deps[g]:
                last[d] = i
        for d in step.block.inputs:
            last[d] = i
        for o in step.block.outputs:
            produced[o] = i
    for name, i in produced.items():
        steps[max(i, last.get(name, i))].free_after.append(name)
    return steps


def peak_bytes_per_sample(steps: list[Step], placeholders: list[str], nbytes: Mapping[str, int]) -> int:
    """Largest per-sample footprint of one frontier over the walk (bytes of one row of every live tensor)."""
    live = sum(nbytes.get(p, 0) for p in placeholders)
    peak = live
    for step in steps:
        live += sum(nbytes.get(g, 0) for g in step.glue) + sum(nbytes.get(o, 0) for o in step.block.outputs)
        peak = max(peak, live)
        live -= sum(nbytes.get(f, 0) for f in step.free_after)
    return peak


class _ShapeProbe(fx.Interpreter):
    """Records, per node, whether it produced a (floating) tensor and its bytes."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.is_tensor: dict[str, bool] = {}
        self.is_float: dict[str, bool] = {}
        self.nbytes: dict[str, int] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        tensor = isinstance(out, torch.Tensor)
        self.is_tensor[n.name] = tensor
        self.is_float[n.name] = tensor and out.is_floating_point()
        self.nbytes[n.name] = out.numel() * out.element_size() if tensor else 0
        return out


def plan_cache(sim: Simulation, one_row: list[torch.Tensor], types: Mapping[str, Any]
               ) -> tuple[Partition, list[Step], int]:
    """Run one row (the graph's inputs in placeholder order) through the float simulation, partition the graph
    into blocks and plan the walk: (partition, steps, bytes per cached row in both frontiers = ``2 * peak``)."""
    probe = _ShapeProbe(sim.gm)
    with sim.full_precision(), torch.no_grad():
        probe.run(*one_row)
    part = partition_graph(sim.gm.graph, sim.layers, sim.acts, types, probe.is_tensor, probe.is_float)
    placeholders = [n.name for n in sim.gm.graph.nodes if n.op == "placeholder"]
    steps = plan_steps(part, placeholders)
    return part, steps, 2 * peak_bytes_per_sample(steps, placeholders, probe.nbytes)


class Frontier:
    """The tensors one model (``fp``: full precision, else quantized so far) still needs, over N samples.

    Args:
        gm: the simulation GraphModule (glue nodes are evaluated on it).
        part: the block partition of ``gm``'s graph.
        inputs: graph inputs by placeholder name, N rows each.
        fp: evaluate in full precision or quantized (``state.precision(fp)`` around each evaluation).
        state: the simulation's shared switch.
        chunk: rows per block evaluation.
    """

    def __init__(
        self, gm: fx.GraphModule, part: Partition, inputs: Mapping[str, torch.Tensor], fp: bool, state: SimState,
        chunk: int,
    ) -> None:
        self.gm, self.part, self.fp, self.state, self.chunk = gm, part, fp, state, max(1, chunk)
        self.nodes = {n.name: n for n in gm.graph.nodes}
        self.env: dict[str, Any] = {}
        self.meta_cache: dict[str, Any] = {}
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                self.env[n.name] = inputs[str(n.target)]
        self.rows = next(iter(inputs.values())).shape[0]

    def _value(self, node: fx.Node) -> Any:
        if node.name in self.env:
            return self.env[node.name]
        if node.name in self.part.meta:
            if node.name not in self.meta_cache:
                self.meta_cache[node.name] = self._compute(node)
            return self.meta_cache[node.name]
        raise RuntimeError(f"node {node.name!r} is needed but was not computed or was already freed")

    def _compute(self, node: fx.Node) -> Any:
        args = fx.node.map_arg(node.args, self._value)
        kwargs = fx.node.map_arg(node.kwargs, self._value)
        if node.op == "call_function":
            return node.target(*args, **kwargs)  # type: ignore[operator]
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, str(node.target))(*rest, **kwargs)
        if node.op == "call_module":
            return self.gm.get_submodule(str(node.target))(*args, **kwargs)
        if node.op == "get_attr":
            return reduce(getattr, str(node.target).split("."), self.gm)
        raise RuntimeError(f"cannot evaluate node {node.name!r} of kind {node.op}")

    def run_glue(self, names: list[str]) -> None:
        """Evaluate glue nodes (graph order) on all N rows."""
        with self.state.precision(self.fp), torch.no_grad():
            for name in names:
                self.env[name] = self._compute(self.nodes[name])

    def inputs(self, spec: BlockSpec) -> list[torch.Tensor]:
        return [self.env[name] for name in spec.inputs]

    def run_block(self, spec: BlockSpec, module: fx.GraphModule) -> list[torch.Tensor]:
        """The block's outputs on all N rows (evaluated ``chunk`` rows at a time, no grad)."""
        xs = self.inputs(spec)
        parts: list[tuple[torch.Tensor, ...]] = []
        with self.state.precision(self.fp), torch.no_grad():
            for start in range(0, self.rows, self.chunk):
                parts.append(module(*[x[start : start + self.chunk] for x in xs]))
        return [torch.cat([p[i] for p in parts]) for i in range(len(spec.outputs))]

    def store(self, spec: BlockSpec, outputs: list[torch.Tensor]) -> None:
        for name, value in zip(spec.outputs, outputs):
            self.env[name] = value

    def free(self, names: list[str]) -> None:
        for name in names:
            self.env.pop(name, None)
        self.meta_cache.clear()

    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.env.values() if isinstance(v, torch.Tensor))
