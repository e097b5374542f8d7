"""The guard at each input of a traced graph, and how to find the guards again.

:func:`qdiff_ao.trace` routes every graph input through a ``_check_traced_input`` call so that a call with
another rank, dtype or non-batch shape fails with a clear error instead of running frozen control flow on the
wrong input::

    sample ─► _check_traced_input(sample, "sample", 4, torch.float32, (3, 16, 16)) ─► conv_in ─► ...

The guard nodes survive ``prepare_fx`` / ``convert_fx`` (their arguments are constants), so the traced input
signature can be read back from any stage of the graph with :func:`traced_input_guards`; nodes are recognised
by identity of their target, never by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

__all__ = ["InputGuards", "check_graph_inputs", "example_inputs_from_guards", "is_input_guard", "traced_input_guards"]

InputGuards = dict[str, tuple[int, torch.dtype, tuple[int, ...]]]
"""{input name: (ndim, dtype, shape without the batch dim)}."""


def _check_traced_input(value: Any, name: str, ndim: int, dtype: torch.dtype, tail_shape: tuple[int, ...]) -> Any:
    """Graph-input guard: return ``value`` unchanged if it matches what was traced.

    ``value.ndim == ndim``, ``value.dtype == dtype`` and ``value.shape[1:] == tail_shape``; dim 0
    (the batch) is free.

    Raises:
        TypeError: ``value`` is not a tensor or has another dtype.
        ValueError: ``value`` has another rank or other non-batch dims.
    """
    dims = ["batch", *map(str, tail_shape)]
    traced = f"a {ndim}-d {dtype} tensor of shape ({', '.join(dims)}{',' if ndim == 1 else ''})"
    if ndim == 0:
        traced = f"a 0-d {dtype} tensor"
    fix = "; the trace froze control flow for that case, re-trace with an example of the new shape"
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"argument {name!r}: the graph was traced with {traced}, received "
            f"{type(value).__name__}; pass a tensor, e.g. torch.full((batch,), t) for a timestep"
        )
    if value.ndim != ndim or tuple(value.shape[1:]) != tail_shape:
        raise ValueError(
            f"argument {name!r}: the graph was traced with {traced}, received a "
            f"{value.ndim}-d tensor of shape {tuple(value.shape)} (only dim 0, the batch, may "
            f"change){fix}"
        )
    if value.dtype != dtype:
        raise TypeError(
            f"argument {name!r}: the graph was traced with {traced}, received dtype "
            f"{value.dtype}; cast with .to({dtype}) or re-trace with an example of the new dtype"
        )
    return value


# Recorded as a leaf call by any fx re-trace (prepare_fx): the generated code of the GraphModule
# also emits ``wrap("...")`` for guard nodes because they carry ``meta["is_wrapped"]``.
fx.wrap("_check_traced_input")


def is_input_guard(node: fx.Node) -> bool:
    """True if ``node`` is the input guard that :func:`qdiff_ao.trace` inserted."""
    return node.op == "call_function" and node.target is _check_traced_input


def traced_input_guards(gm: fx.GraphModule) -> InputGuards:
    """{input name: (ndim, dtype, shape without the batch dim)} read from the input guards of ``qdiff_ao.trace``."""
    guards = {}
    for node in gm.graph.nodes:
        if is_input_guard(node):
            _, name, ndim, dtype, tail = node.args[:5]
            guards[str(name)] = (int(ndim), dtype, tuple(tail))
    return guards


def check_graph_inputs(guards: InputGuards, inputs: Mapping[str, Any]) -> None:
    """Run the guards on ``inputs`` outside the graph (a frozen module ran them once, at trace time).

    Raises:
        TypeError, ValueError: as the guard (see ``_check_traced_input``).
    """
    for name, (ndim, dtype, tail) in guards.items():
        _check_traced_input(inputs[name], name, ndim, dtype, tail)


def example_inputs_from_guards(guards: InputGuards, timestep: int = 500) -> dict[str, torch.Tensor]:
    """One seeded sample of every traced input: float inputs ~ N(0, 1), ``timestep`` filled with ``timestep``,
    other integer inputs (class labels) 0; shapes ``(1, *traced tail)`` (0-d where traced 0-d)."""
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name, (ndim, dtype, tail) in guards.items():
        shape = (1, *tail) if ndim >= 1 else ()
        if dtype.is_floating_point and name != "timestep":
            inputs[name] = torch.randn(shape, generator=g).to(dtype)
        else:
            inputs[name] = torch.full(shape, timestep if name == "timestep" else 0, dtype=dtype)
    return inputs
