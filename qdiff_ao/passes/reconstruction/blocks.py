"""Cut a prepared UNet graph into reconstruction blocks (BRECQ) and compile each block into its own GraphModule.

A block is found from the module hierarchy, not from names: each quantized conv/linear walks up its qualified
name to the nearest ancestor that is a diffusers ``ResnetBlock2D`` or ``BasicTransformerBlock``, or an
``Attention`` not inside a ``BasicTransformerBlock``; a layer without such an ancestor (conv_in/out, up/down
samplers, time-embedding linears, proj_in/proj_out) is a block of its own.

Which graph nodes belong to a block (a prepared graph keeps module paths on ``call_module`` nodes only):

    1. anchors       every call_module whose target lies under the block's module path;
    2. quantizers    an activation observer feeding a quantized layer belongs to that layer's block (the layer's
                     input quantizer; first consumer in graph order);
    3. hull          nodes that are both descendants and ancestors of the block's nodes (matmul, softmax, the
                     ``temb[:, :, None, None]`` add, ...);
    4. trailing      in graph order, a node whose tensor inputs all come from block B, B's inputs or the blocks
                     feeding B joins B (residual adds, the output rescale, output observers); anything else is
                     glue (skip concats, the timestep embedding, GroupNorm/SiLU outside blocks), computed outside
                     the blocks.

Nodes whose value is not a tensor (shapes, sizes, tuples) and constants are "meta": never cached, recomputed
inside every unit that needs them, so a block works for any batch size.

    block inputs ──► [ anchors + quantizers + hull + trailing, meta recomputed ] ──► block outputs
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from qdiff_ao.capture.view_ops import is_view_op

__all__ = ["BlockSpec", "Partition", "compile_block", "partition_graph", "resolve_block_root"]



def _block_classes() -> dict[str, type]:
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    return {"resnet": ResnetBlock2D, "transformer": BasicTransformerBlock, "attention": Attention}


def _is(t: Any, cls: type) -> bool:
    if isinstance(t, type):
        return issubclass(t, cls)
    return isinstance(t, str) and t in (f"{cls.__module__}.{cls.__qualname__}", cls.__qualname__)


def resolve_block_root(layer: str, module_types: Mapping[str, Any]) -> tuple[str, str]:
    """(block module path, kind) of quantized layer ``layer``; kind is resnet | transformer | attention | layer.

    ``module_types`` maps qualified module names of the original model to their classes (or "module.Class").

    Example:
        >>> from diffusers.models.resnet import ResnetBlock2D
        >>> resolve_block_root("up.0.res.1.conv1", {"up.0.res.1": ResnetBlock2D, "up.0": object})
        ('up.0.res.1', 'resnet')
        >>> resolve_block_root("conv_in", {})
        ('conv_in', 'layer')
    """
    classes = _block_classes()
    parts = layer.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
    for i, path in enumerate(ancestors):
        t = module_types.get(path)
        if _is(t, classes["resnet"]):
            return path, "resnet"
        if _is(t, classes["transformer"]):
            return path, "transformer"
        if _is(t, classes["attention"]):
            if any(_is(module_types.get(up), classes["transformer"]) for up in ancestors[i + 1 :]):
                continue
            return path, "attention"
    return layer, "layer"


@dataclass
class BlockSpec:
    """One reconstruction block.

    Attributes:
        name: the block's module path (a layer's own name for single-layer blocks).
        kind: "resnet", "transformer", "attention" or "layer".
        layers: quantized conv/linear module names, graph order.
        acts: activation quantizer (observer) module names owned by the block, graph order.
        nodes: names of the (non-meta) graph nodes computed by the block, graph order.
        inputs: names of the outside tensor nodes it reads; the compiled module takes them in this order.
        outputs: names of its nodes read outside it; the compiled module returns them in this order.
        loss_outputs: indices into ``outputs`` of the floating tensors the reconstruction loss compares: those
            computed from the block's layers (a re-quantized block input is not), views of another output left
            out so that no value is counted twice.
    """

    name: str
    kind: str
    first_index: int
    layers: list[str] = field(default_factory=list)
    acts: list[str] = field(default_factory=list)
    nodes: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    loss_outputs: list[int] = field(default_factory=list)


@dataclass
class Partition:
    """Blocks in execution order, the unit of every non-meta node (block name or None for glue), meta nodes."""

    blocks: list[BlockSpec]
    unit: dict[str, str | None]
    meta: set[str]
    deps: dict[str, list[str]]


def _tensor_deps(node: fx.Node, meta: set[str]) -> list[str]:
    """Non-meta nodes feeding ``node``, looking through meta nodes (shape arithmetic, tuples, constants)."""
    out: list[str] = []
    seen: set[str] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.name in meta:
            stack.extend(n.all_input_nodes)
        else:
            out.append(n.name)
    return out


def partition_graph(
    graph: fx.Graph,
    layers: Iterable[str],
    acts: Iterable[str],
    module_types: Mapping[str, Any],
    is_tensor: Mapping[str, bool],
    is_float: Mapping[str, bool],
) -> Partition:
    """Assign the nodes of ``graph`` to blocks (see the module docstring) and order the blocks.

    Args:
        graph: the simulation's graph (node names as in the prepared graph).
        layers: module names of the quantized conv/linear layers.
        acts: module names of the activation observers.
        module_types: qualified module name -> class of the original model.
        is_tensor, is_float: per node name, whether a probe run produced a tensor / a floating tensor.
    """
    layer_set, act_set = set(layers), set(acts)
    nodes = [n for n in graph.nodes if n.op != "output"]
    index = {n.name: i for i, n in enumerate(nodes)}
    by_name = {n.name: n for n in nodes}
    meta = {
        n.name for n in nodes
        if n.op == "get_attr" or (n.op != "placeholder" and not is_tensor.get(n.name, False))
    }
    deps = {n.name: _tensor_deps(n, meta) for n in nodes if n.name not in meta}
    assign: dict[str, str] = {}
    blocks: dict[str, BlockSpec] = {}

    # 1. anchors: quantized layers and every module under a block's path
    for n in nodes:
        if n.op == "call_module" and str(n.target) in layer_set:
            root, kind = resolve_block_root(str(n.target), module_types)
            blocks.setdefault(root, BlockSpec(root, kind, index[n.name]))
            if str(n.target) not in blocks[root].layers:
                blocks[root].layers.append(str(n.target))
            assign[n.name] = root
    for n in nodes:
        if n.op == "call_module" and n.name not in assign and str(n.target) not in act_set:
            parts = str(n.target).split(".")
            for i in range(len(parts) - 1, 0, -1):
                root = ".".join(parts[:i])
                if root in blocks and blocks[root].kind != "layer":
                    assign[n.name] = root
                    break
    # 2. output quantizers of quantized layers; input quantizers of quantized layers (owned by the first block
    #    reading them, so that no earlier block depends on a later one)
    for n in nodes:
        if n.op != "call_module" or str(n.target) not in act_set:
            continue
        src = n.args[0] if n.args else None
        if isinstance(src, fx.Node) and src.op == "call_module" and str(src.target) in layer_set:
            assign[n.name] = assign[src.name]
        elif any(u.op == "call_module" and str(u.target) in layer_set for u in n.users):
            readers = [u for u in n.users if u.name in assign]
            assign[n.name] = assign[min(readers, key=lambda u: index[u.name]).name]
    # 3. hulls
    for root in blocks:
        own = [by_name[k] for k, v in assign.items() if v == root]
        desc = _reach(own, lambda m: m.users, assign, root)
        anc = _reach(own, lambda m: m.all_input_nodes, assign, root)
        for name in sorted(desc & anc, key=index.__getitem__):
            node = by_name[name]
            if name not in assign and name not in meta and node.op in ("call_function", "call_method"):
                assign[name] = root
    # 4. trailing nodes and output quantizers, in graph order
    inputs_of: dict[str, set[str]] = {r: set() for r in blocks}
    feeders: dict[str, set[str]] = {r: set() for r in blocks}

    def note(name: str, root: str) -> None:
        for d in deps[name]:
            if assign.get(d) != root:
                inputs_of[root].add(d)
                if d in assign:
                    feeders[root].add(assign[d])

    for name, root in list(assign.items()):
        if name not in meta:
            note(name, root)
    for n in nodes:
        if n.name in assign or n.name in meta or n.op in ("placeholder", "get_attr"):
            continue
        ds = deps[n.name]
        owners = {assign[d] for d in ds if d in assign}
        if not owners:
            continue
        if n.op == "call_module":
            if str(n.target) not in act_set:
                continue  # GroupNorm / SiLU outside any block: glue
            chosen = assign[ds[0]] if ds and ds[0] in assign else None
        else:
            latest = max(owners, key=lambda r: blocks[r].first_index)
            ok = all(assign.get(d) == latest or d in inputs_of[latest] or assign.get(d) in feeders[latest] for d in ds)
            chosen = latest if ok else None
        if chosen is not None:
            assign[n.name] = chosen
            note(n.name, chosen)

    unit: dict[str, str | None] = {n.name: assign.get(n.name) for n in nodes if n.name not in meta}
    for name, root in assign.items():
        if name in meta:
            continue
        node = by_name[name]
        blocks[root].nodes.append(name)
        if node.op == "call_module" and str(node.target) in act_set:
            blocks[root].acts.append(str(node.target))
    for spec in blocks.values():
        spec.nodes.sort(key=index.__getitem__)
        spec.acts.sort(key=lambda a: min(index[m] for m in spec.nodes if str(by_name[m].target) == a))
    ordered = _order_blocks(blocks, unit, deps)
    _set_io(ordered, graph, unit, deps, meta, by_name, is_float)
    return Partition(ordered, unit, meta, deps)


def _reach(start: list[fx.Node], step: Any, assign: Mapping[str, str], root: str) -> set[str]:
    """Nodes reachable from ``start`` along ``step`` without passing through other blocks' nodes."""
    seen: set[str] = set()
    stack = [m for n in start for m in step(n)]
    while stack:
        n = stack.pop()
        if n.name in seen or n.op == "output" or assign.get(n.name, root) != root:
            continue
        seen.add(n.name)
        stack.extend(step(n))
    return seen


def _order_blocks(
    blocks: dict[str, BlockSpec], unit: Mapping[str, str | None], deps: Mapping[str, list[str]]
) -> list[BlockSpec]:
    """Topological order of the blocks (through glue), ties broken by the first layer's graph position."""
    glue_cache: dict[str, set[str]] = {}

    def upstream(name: str) -> set[str]:
        owner = unit.get(name)
        if owner is not None:
            return {owner}
        if name not in glue_cache:
            glue_cache[name] = set()
            glue_cache[name] = set().union(*[upstream(d) for d in deps.get(name, [])])
        return glue_cache[name]

    needs = {r: set().union(*[upstream(d) for n in b.nodes for d in deps[n] if unit.get(d) != r]) - {r}
             for r, b in blocks.items()}
    users: dict[str, set[str]] = {r: set() for r in blocks}
    for r, ups in needs.items():
        for u in ups:
            users[u].add(r)
    remaining = {r: len(ups) for r, ups in needs.items()}
    heap = [(b.first_index, r) for r, b in blocks.items() if remaining[r] == 0]
    heapq.heapify(heap)
    order: list[BlockSpec] = []
    while heap:
        _, r = heapq.heappop(heap)
        order.append(blocks[r])
        for u in users[r]:
            remaining[u] -= 1
            if remaining[u] == 0:
                heapq.heappush(heap, (blocks[u].first_index, u))
    if len(order) != len(blocks):
        stuck = sorted(r for r, k in remaining.items() if k > 0)
        raise RuntimeError(f"reconstruction blocks depend on each other in a cycle: {stuck[:6]}")
    return order


def _view_root(name: str, members: set[str], by_name: Mapping[str, fx.Node]) -> str:
    """Follow shape-only ops (view, reshape, transpose, ...) back to their source inside the block."""
    node = by_name[name]
    while True:
        src = node.args[0] if node.args else None
        if not is_view_op(node) or not isinstance(src, fx.Node) or src.name not in members:
            return node.name
        node = src


def _set_io(
    blocks: list[BlockSpec],
    graph: fx.Graph,
    unit: Mapping[str, str | None],
    deps: Mapping[str, list[str]],
    meta: set[str],
    by_name: Mapping[str, fx.Node],
    is_float: Mapping[str, bool],
) -> None:
    readers: dict[str, set[str | None]] = {}
    for name, owner in unit.items():
        for d in deps[name]:
            readers.setdefault(d, set()).add(owner if owner is not None else f"glue:{name}")
    out_node = next(n for n in graph.nodes if n.op == "output")
    for d in _tensor_deps(out_node, meta):
        readers.setdefault(d, set()).add("output")
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    for spec in blocks:
        members = set(spec.nodes)
        spec.inputs = sorted({d for n in spec.nodes for d in deps[n] if d not in members}, key=index.__getitem__)
        spec.outputs = [n for n in spec.nodes if readers.get(n, set()) - {spec.name}]
        weighted = _reach([by_name[n] for n in spec.nodes if by_name[n].op == "call_module"
                           and str(by_name[n].target) in spec.layers], lambda m: m.users, {}, spec.name)
        weighted = (weighted & members) | {n for n in spec.nodes if str(by_name[n].target) in spec.layers}
        seen_roots: set[str] = set()
        spec.loss_outputs = []
        for i, out in enumerate(spec.outputs):
            root = _view_root(out, members, by_name)
            if is_float.get(out, False) and out in weighted and root not in seen_roots:
                seen_roots.add(root)
                spec.loss_outputs.append(i)


def compile_block(root: torch.nn.Module, graph: fx.Graph, spec: BlockSpec, meta: set[str]) -> fx.GraphModule:
    """A GraphModule computing ``spec.outputs`` (a tuple) from ``spec.inputs`` (positional), sharing ``root``'s
    modules; meta nodes the block needs are recomputed inside it."""
    by_name = {n.name: n for n in graph.nodes}
    members = set(spec.nodes)
    sub = fx.Graph()
    env: dict[str, fx.Node] = {}
    for name in spec.inputs:
        env[name] = sub.placeholder(name)

    def copy(node: fx.Node) -> fx.Node:
        if node.name not in env:
            if node.name not in meta and node.name not in members:
                raise RuntimeError(f"block {spec.name!r} reads node {node.name!r} that is not one of its inputs")
            for arg in node.all_input_nodes:
                copy(arg)
            env[node.name] = sub.node_copy(node, lambda a: env[a.name])
        return env[node.name]

    for name in spec.nodes:
        copy(by_name[name])
    sub.output(tuple(env[o] for o in spec.outputs))
    sub.lint()
    return fx.GraphModule(root, sub, class_name="ReconstructionBlock")

