"""Lowered timestep groups: one converted graph per group, sharing the packed integer weights.

A prepared graph with per-group activation grids (``passes.choose_timestep_groups``) lowers to

* the single-grid converted graph (what ``convert_fx`` makes of the prepared graph as it is), and
* per kept group ``g``, the entries of the converted state dict that differ when the activation observers hold
  group ``g``'s qparams: ``_scale_k`` / ``_zero_point_k`` buffers (inputs of ``quantize_per_tensor`` and of the
  quantized functional ops) and the ``scale`` / ``zero_point`` of quantized Conv2d / Linear modules
  (:func:`lower_groups`). The graph code and every weight are the same in each group (checked).

:func:`group_graph` rebuilds group ``g``'s graph from the single-grid one: a copy whose quantized modules point at
the same packed weights (no second copy of the weights stays alive) with the group's entries written in.
``QuantizedUNet`` runs the group of the batch's timestep; checkpoints store the entries per group.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import cast

import torch
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.capture.graph_state import graph_info, has_graph_info, update_graph_info
from qdiff_ao.observers.frozen import FrozenObserver
from qdiff_ao.quantizers.timestep_grids import TimestepGroupGrids

__all__ = ["converted_for_group", "group_graph", "lower_groups", "lowered_groups_of", "prepared_for_group",
           "without_groups"]

_MODULE_QPARAMS = ("scale", "zero_point")  # plain attributes of torch.ao's quantized Conv2d / Linear


def _plain_tensors(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    return {k: v for k, v in gm.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_quantized}


def _differing_entries(group: fx.GraphModule, base: fx.GraphModule, where: str) -> dict[str, torch.Tensor]:
    if group.code != base.code:
        raise RuntimeError(f"{where}: the converted graph differs in structure from the single-grid one")
    ours, theirs = _plain_tensors(group), _plain_tensors(base)
    if set(ours) != set(theirs):
        raise RuntimeError(f"{where}: the converted state dicts name different tensors")
    out = {}
    for key, value in ours.items():
        if value.shape != theirs[key].shape or not torch.equal(value, theirs[key]):
            owner, _, attr = key.rpartition(".")
            if attr not in _MODULE_QPARAMS and "_scale_" not in attr and "_zero_point_" not in attr:
                raise RuntimeError(f"{where}: {key!r} differs between groups, but only activation qparams may")
            out[key] = value.detach().clone()
    return out


def prepared_for_group(prepared: fx.GraphModule, group: int) -> tuple[fx.GraphModule, bool]:
    """A copy of a prepared graph with timestep groups whose activation observers hold group ``group``'s qparams
    (frozen) and whose graph info has no groups; and whether any qparam differs from the single grids.

    Raises:
        ValueError: the graph has no timestep groups, or ``group`` is out of range.
    """
    groups = graph_info(prepared).timestep_groups if has_graph_info(prepared) else None
    if not isinstance(groups, TimestepGroupGrids) or not groups.grids:
        raise ValueError("the prepared graph has no timestep groups (see qdiff_ao.passes.choose_timestep_groups)")
    if not 0 <= group < groups.num_groups:
        raise ValueError(f"timestep group {group} does not exist; the graph has groups 0..{groups.num_groups - 1}")
    copy_g = copy.deepcopy(prepared)
    update_graph_info(copy_g, timestep_groups=None)
    changed = False
    for name, grids in groups.grids.items():
        observer = cast(ObserverBase, copy_g.get_submodule(name))
        scale, zero_point = grids[group]
        old_scale, old_zero = observer.calculate_qparams()
        if float(old_scale) == float(torch.tensor(scale, dtype=torch.float32)) and int(old_zero) == zero_point:
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(copy_g.get_submodule(parent) if parent else copy_g, leaf,
                FrozenObserver.like(observer, torch.tensor(scale), torch.tensor(zero_point)))
        changed = True
    return copy_g, changed


def lower_groups(prepared: fx.GraphModule, convert: Callable[[fx.GraphModule], fx.GraphModule]
                 ) -> tuple[fx.GraphModule, TimestepGroupGrids | None]:
    """Convert ``prepared`` (in place, as ``convert_fx`` does) and, when it carries timestep groups, each kept
    group on a copy; returns (the single-grid converted graph, the groups with their lowered entries or None).

    The converted graph's info holds the lowered groups (``graph_info(gm).timestep_groups.lowered``).
    """
    groups = graph_info(prepared).timestep_groups
    if not isinstance(groups, TimestepGroupGrids) or not groups.grids:
        return convert(prepared), None
    variants: list[fx.GraphModule | None] = []
    for g in range(groups.num_groups):
        copy_g, changed = prepared_for_group(prepared, g)
        variants.append(convert(copy_g) if changed else None)
    base = convert(prepared)
    entries = tuple({} if v is None else _differing_entries(v, base, f"timestep group {g}")
                    for g, v in enumerate(variants))
    lowered = dataclasses.replace(groups, lowered=entries)
    update_graph_info(base, timestep_groups=lowered)
    return base, lowered


def lowered_groups_of(gm: fx.GraphModule) -> TimestepGroupGrids | None:
    """The lowered timestep groups a converted graph carries (None: one grid for every timestep)."""
    groups = graph_info(gm).timestep_groups if has_graph_info(gm) else None
    if isinstance(groups, TimestepGroupGrids) and groups.lowered is not None and any(groups.lowered):
        return groups
    return None


def _set_entry(gm: fx.GraphModule, key: str, value: torch.Tensor) -> None:
    owner_name, _, attr = key.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    if attr in owner._buffers:
        owner._buffers[attr] = value.detach().clone().to(owner._buffers[attr].dtype)  # type: ignore[union-attr]
    elif attr in _MODULE_QPARAMS and hasattr(owner, "_packed_params"):
        setattr(owner, attr, float(value) if attr == "scale" else int(value))
    else:
        raise ValueError(f"cannot set {key!r}: it is neither a buffer nor a quantized module's scale / zero_point")


def group_graph(base: fx.GraphModule, entries: Mapping[str, torch.Tensor]) -> fx.GraphModule:
    """A copy of the converted ``base`` with ``entries`` written in, its quantized modules sharing ``base``'s
    packed weights (so the copy costs the qparams and the float tensors, not the integer weights)."""
    clone = copy.deepcopy(base)
    originals = dict(base.named_modules())
    for name, module in clone.named_modules():
        packed = getattr(originals.get(name), "_packed_params", None)
        if packed is not None and hasattr(module, "_packed_params"):
            if isinstance(packed, nn.Module):
                module._modules["_packed_params"] = packed  # Linear: a LinearPackedParams submodule
            else:
                module._packed_params = packed  # Conv2d: the packed ScriptObject itself
    for key, value in entries.items():
        _set_entry(clone, key, value)
    return clone


def without_groups(gm: fx.GraphModule, entries: Mapping[str, torch.Tensor] | None = None) -> fx.GraphModule:
    """A copy of a converted graph (sharing its packed weights) with ``entries`` written in and no timestep groups
    in its graph info: the graph runs the qparams written in it, for every timestep (how one group's graph is
    exported on its own)."""
    clone = group_graph(gm, entries or {})
    if has_graph_info(clone):
        update_graph_info(clone, timestep_groups=None)
    return clone


def converted_for_group(converted: fx.GraphModule, group: int) -> fx.GraphModule:
    """The converted counterpart of :func:`prepared_for_group`: group ``group``'s graph on its own.

    Raises:
        ValueError: the graph has no lowered timestep groups, or ``group`` is out of range.
    """
    groups = lowered_groups_of(converted)
    if groups is None or groups.lowered is None:
        raise ValueError("the converted graph has no lowered timestep groups")
    if not 0 <= group < groups.num_groups:
        raise ValueError(f"timestep group {group} does not exist; the graph has groups 0..{groups.num_groups - 1}")
    return without_groups(converted, groups.lowered[group])
