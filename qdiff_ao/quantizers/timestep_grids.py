"""Activation grids per group of timesteps: the table a prepared graph carries, and how a group's grid is drawn.

A UNet's activation ranges drift along the trajectory (the input ``x_t`` shrinks from ``|x_t| ~ 4`` at the first
steps to the data range at the last); one grid per activation serves all steps. Here the calibration timesteps
are cut into ``G`` contiguous groups of equal counts (:func:`contiguous_groups`) and an activation may get one grid
per group while the weights stay shared. The group of a timestep ``t`` is ``g(t) = #{boundaries <= t}``
(``torch.bucketize(t, boundaries, right=True)``; boundaries half-way between adjacent groups), the convention of
the output correction.

A group's grid (:func:`mapped_grid`) carries the clipping the recipe chose for the whole trajectory over to the
group's own input range: with ``[L, U]`` the final grid (after reconstruction's step-size learning), ``[m, M]``
the float input's range over all calibration rows and ``[m_g, M_g]`` over the group's rows,

    [L_g, U_g] = m_g + ([L, U] - m) (M_g - m_g) / (M - m)      (L_g = 0 when the input is never negative),
    s_g = (U_g - L_g) / (quant_max - quant_min),   z_g = clamp(round(quant_min - L_g / s_g), quant_min, quant_max).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TimestepGroupGrids", "contiguous_groups", "group_boundaries", "mapped_grid"]


def contiguous_groups(timesteps: Sequence[float], num_groups: int) -> list[list[float]]:
    """``timesteps`` (sorted) cut into ``min(num_groups, len)`` contiguous runs whose lengths differ by <= 1."""
    g = max(1, min(num_groups, len(timesteps)))
    size, extra = divmod(len(timesteps), g)
    out, start = [], 0
    for i in range(g):
        stop = start + size + (1 if i < extra else 0)
        out.append(list(timesteps[start:stop]))
        start = stop
    return out


def group_boundaries(groups: Sequence[Sequence[float]]) -> list[float]:
    """``G - 1`` ascending boundaries half-way between adjacent groups (last of one, first of the next)."""
    return [(float(groups[i][-1]) + float(groups[i + 1][0])) / 2 for i in range(len(groups) - 1)]


def mapped_grid(
    grid: tuple[float, float], full_range: tuple[float, float], group_range: tuple[float, float],
    quant_min: int, quant_max: int, *, symmetric: bool = False,
) -> tuple[float, int]:
    """``(s_g, z_g)``: the grid ``[L, U]`` chosen on ``full_range`` ``[m, M]``, mapped onto ``group_range`` (module
    docstring). A group whose range is a point keeps a step of ``1e-8`` (its values all map to one code).

    ``symmetric=True`` (a symmetric quantizer, e.g. attention's Q, K, V) keeps the grid's zero point and scales its
    step by the ratio of absolute ranges, ``s_g = s max(|m_g|, |M_g|) / max(|m|, |M|)``, so the group grid stays
    symmetric (and exports as INT8 with zero point 0 like the single grid).

    Example:
        >>> mapped_grid((0.0, 2.0), (0.0, 4.0), (0.0, 1.0), 0, 255)   # half the range clipped: kept per group
        (0.00196078431372549, 0)
        >>> s, z = mapped_grid((-1.28, 1.27), (-3.0, 2.0), (-1.5, 0.5), 0, 255, symmetric=True)   # step halved
        >>> round(s, 9), z
        (0.005, 128)
    """
    (lo, hi), (m, big_m), (mg, big_mg) = grid, full_range, group_range
    if symmetric:
        s = (hi - lo) / (quant_max - quant_min)
        zero = min(max(round(quant_min - lo / s), quant_min), quant_max)
        k_abs = max(abs(mg), abs(big_mg)) / max(abs(m), abs(big_m), 1e-12)
        return max(s * k_abs, 1e-8), int(zero)
    k = (big_mg - mg) / max(big_m - m, 1e-12)
    lo_g = 0.0 if m >= 0 else mg + (lo - m) * k
    hi_g = mg + (hi - m) * k
    s_g = max((hi_g - lo_g) / (quant_max - quant_min), 1e-8)
    z_g = min(max(round(quant_min - lo_g / s_g), quant_min), quant_max)
    return s_g, int(z_g)


@dataclass(frozen=True)
class TimestepGroupGrids:
    """Per-group activation grids of a graph (graph info field ``timestep_groups``).

    Attributes:
        boundaries: ``G - 1`` ascending timesteps; group of ``t`` = ``bucketize(t, boundaries, right=True)``.
        grids: ``{activation observer name: ((s_0, z_0), ..., (s_{G-1}, z_{G-1}))}`` on a prepared graph; a group
            that keeps the single grid holds the observer's own qparams. Empty on a loaded checkpoint.
        lowered: after ``qdiff_ao.convert``: per group, the converted graph's entries that differ from the
            single-grid graph (``{state-dict key: tensor}``: ``_scale_k`` / ``_zero_point_k`` buffers, quantized
            modules' ``scale`` / ``zero_point``); ``{}`` for a group that keeps the single grid. ``None`` before.
        report: what chose them (``passes.choose_timestep_groups``): per group its timesteps, held-back errors,
            whether it was kept.
    """

    boundaries: tuple[float, ...]
    grids: Mapping[str, tuple[tuple[float, int], ...]]
    lowered: tuple[Mapping[str, torch.Tensor], ...] | None = None
    report: Mapping[str, Any] | None = None

    @property
    def num_groups(self) -> int:
        return len(self.boundaries) + 1

    def group_of(self, timestep: torch.Tensor) -> torch.Tensor:
        """Group index of each timestep (flattened)."""
        bounds = torch.tensor(self.boundaries, dtype=torch.float64, device=timestep.device)
        return torch.bucketize(timestep.detach().reshape(-1).to(torch.float64), bounds, right=True)
