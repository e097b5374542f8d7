"""Carry calibrated observer statistics over to a graph prepared again from the same model.

Why this is exact: during :func:`qdiff_ao.calibrate` a prepared graph computes the float model (observers only
record what passes), so an observer's statistics are a function of three things: the traced value it observes, its
own configuration and the calibration set. The precision fallback prepares the model again with more layers in
``keep_float``; every observer of that new graph whose value and configuration had an observer in the calibrated
graph would record the same statistics a second time. Copying them instead saves one calibration pass per fallback
round that keeps layers (4.3-7.9x faster than that pass on the zoo models; ``benchmarks/observer_transfer.py``).

An observer is matched by the key

    key(obs) = ( value(obs), config(obs_1), ..., config(obs_k) )

where ``obs_1 ... obs_k`` is the chain of observer nodes from ``obs`` up its input to the first non-observer node,
``value`` is that node's traced name (tracing is deterministic and happens before ``prepare``, so names agree
between preparations), and ``config`` is the module's type with its plain public attributes (dtype, qscheme, code
range, p, bins, ...) and buffer names, recursively through its submodules. Observer modules shared by several
nodes (torch.ao shares one instance across ops with shared qparams) must be shared by the same keys in both graphs.

The transfer is all or nothing: when one observer of the new graph has no unique match (a new value is observed, a
configuration changed, an observer keeps public counters that differ from a fresh one's), nothing is copied and the
caller calibrates as before. A graph with a training-mode module that has non-observer buffers (BatchNorm running
statistics, which a calibration pass would update) is refused the same way.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.quantizers.fixed import FixedFakeQuantize

__all__ = ["transfer_observer_statistics"]

_Key = tuple[Any, ...]
_PLAIN = (bool, int, float, str, torch.dtype, torch.qscheme, type(None))


def _is_stateful_quantizer(module: nn.Module) -> bool:
    return isinstance(module, (ObserverBase, FixedFakeQuantize))


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _configuration(module: nn.Module) -> _Key:
    """What makes two observers record the same statistics from the same values: the type, the plain public
    attributes, the buffer names, and the same of every submodule (e.g. a timestep-aware observer's base)."""
    attributes = tuple(sorted((k, repr(v)) for k, v in vars(module).items()
                              if not k.startswith("_") and k != "training" and _plain(v)))
    children = tuple((name, _configuration(child)) for name, child in module.named_children())
    return (type(module).__module__, type(module).__qualname__, attributes, tuple(sorted(module._buffers)), children)


def _observer_keys(gm: fx.GraphModule) -> dict[str, tuple[list[_Key], list[str]]] | None:
    """For every stateful quantizer module of ``gm`` (by its first name): the keys of the graph nodes calling it
    and every attribute name it is reached by. ``None`` when a key repeats (two nodes that cannot be told apart)
    or a quantizer module is called by no node."""
    named = list(gm.named_modules(remove_duplicate=False))
    first_name: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, module in named:
        if _is_stateful_quantizer(module) and not _inside_quantizer(name, gm):
            canonical = first_name.setdefault(id(module), name)
            aliases.setdefault(canonical, []).append(name)

    def quantizer_of(node: object) -> str | None:
        if not (isinstance(node, fx.Node) and node.op == "call_module"):
            return None
        return first_name.get(id(gm.get_submodule(str(node.target))))

    configs: dict[str, _Key] = {}
    keys: dict[str, list[_Key]] = {}
    seen: set[_Key] = set()
    for node in gm.graph.nodes:
        if quantizer_of(node) is None:
            continue
        chain, current = [], node
        while (quantizer := quantizer_of(current)) is not None:
            if quantizer not in configs:
                configs[quantizer] = _configuration(gm.get_submodule(quantizer))
            chain.append(configs[quantizer])
            arg = current.args[0] if current.args else None
            current = arg if isinstance(arg, fx.Node) else None
        key = (current.name if current is not None else None, *chain)
        if key in seen:
            return None
        seen.add(key)
        keys.setdefault(str(quantizer_of(node)), []).append(key)
    if set(keys) != set(aliases):
        return None
    return {name: (sorted(k, key=repr), aliases[name]) for name, k in keys.items()}


def _inside_quantizer(name: str, gm: nn.Module) -> bool:
    parts = name.split(".")
    return any(_is_stateful_quantizer(gm.get_submodule(".".join(parts[:i]))) for i in range(1, len(parts)))


def _updates_buffers_in_forward(gm: fx.GraphModule) -> bool:
    return any(m.training and m._buffers and not _is_stateful_quantizer(m) and not _inside_quantizer(name, gm)
               for name, m in gm.named_modules())


def transfer_observer_statistics(source: fx.GraphModule, target: fx.GraphModule) -> list[str]:
    """Give every observer of ``target`` a copy of its calibrated counterpart in ``source`` (see the module
    docstring), so ``target`` holds the statistics :func:`qdiff_ao.calibrate` on the same set would give it.

    Args:
        source: a calibrated prepared graph.
        target: a graph prepared from the same model (other ``keep_float`` or layer choices), not yet calibrated.

    Returns:
        The target's observer modules that could not be matched; empty when every observer was copied. When it is
        not empty nothing was copied: calibrate ``target`` instead.
    """
    source_keys, target_keys = _observer_keys(source), _observer_keys(target)
    refused = _updates_buffers_in_forward(target)
    if target_keys == {} and not refused:
        return []  # nothing observes (weights-only): nothing to calibrate
    if source_keys is None or target_keys is None or refused:
        return sorted(target_keys) if target_keys else ["<graph>"]
    owner = {key: name for name, (keys, _) in source_keys.items() for key in keys}
    plan: dict[str, str] = {}
    unmatched = []
    for name, (keys, _) in target_keys.items():
        sources = {owner.get(key) for key in keys}
        match = sources.pop() if len(sources) == 1 else None
        # the matched module must observe exactly these values: sharing must agree between the graphs
        if match is None or source_keys[match][0] != keys:
            unmatched.append(name)
        else:
            plan[name] = match
    if unmatched:
        return sorted(unmatched)
    for name, match in plan.items():
        copied = copy.deepcopy(source.get_submodule(match))
        copied.train(target.get_submodule(name).training)
        for alias in target_keys[name][1]:
            target.set_submodule(alias, copied)
    return []
