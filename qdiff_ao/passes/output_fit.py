"""Least-squares output corrections from channel moments, and their leave-one-trajectory-out errors.

The output correction (``passes.output_correction``) compares, per group of timesteps, candidate corrections
``y' = a y + c x - b`` of the quantized output ``y`` (``x``: the UNet's input) against the float output ``f``. Every
candidate and its squared error follow from the per-channel second moments ``sum z z^T`` of ``z = (q, x, f, 1)``,
so the pass keeps ``(trajectories, C, 4, 4)`` numbers per group instead of the outputs themselves.
"""

from __future__ import annotations

import torch

__all__ = ["FEATURES", "KINDS", "channel_moments", "fit_candidates", "left_out_errors", "row_moments",
           "squared_error"]

FEATURES = 4  # per channel: q (quantized output), x (the UNet input), f (float output), 1
KINDS = ("none", "offset", "gain", "input")


def row_moments(y_q: torch.Tensor, y_fp: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """``(N, C, 4, 4)`` float64: per row (dim 0) and channel (dim 1) the sums of products ``sum z z^T`` of
    ``z = (q, x, f, 1)`` over positions (``x = 0`` where the input cannot serve as a regressor)."""
    q, f = y_q.double(), y_fp.double()
    xs = torch.zeros_like(q) if x is None else x.double()
    z = torch.stack([q, xs, f, torch.ones_like(q)]).flatten(3)  # (4, N, C, M)
    return torch.einsum("incm,jncm->ncij", z, z)


def channel_moments(y_q: torch.Tensor, y_fp: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """``(C, 4, 4)``: :func:`row_moments` summed over the rows."""
    return row_moments(y_q, y_fp, x).sum(0)


def _plane(moments: torch.Tensor, regressors: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Least-squares ``f ~ a q + c x + d`` per channel over the given regressors (0 = q, 1 = x), as ``(a, c, b)``
    of ``y' = a y + c x - b`` (``b = -d``), from centred moments. A regressor without variance (<= 1e-12 of its
    second moment, e.g. ``x = 0``) is left out with its neutral coefficient (``a = 1``, ``c = 0``) instead of
    getting an arbitrary one; collinear regressors get the minimum-norm solution."""
    n = moments[:, 3, 3]
    mean = moments[:, :3, 3] / n[:, None]  # (C, 3): q, x, f
    cov = moments[:, :3, :3] / n[:, None, None] - mean[:, :, None] * mean[:, None, :]
    coef = torch.zeros(moments.shape[0], 2, dtype=moments.dtype)
    coef[:, 0] = 1.0
    for ch in range(moments.shape[0]):
        second = moments[ch, [0, 1], [0, 1]] / n[ch]
        keep = [i for i in regressors if cov[ch, i, i] > 1e-12 * second[i].clamp_min(1e-30)]
        if not keep:
            continue
        fixed = [i for i in (0, 1) if i not in keep]
        # the target minus the fixed terms: f - a q where q is left out with a = 1
        rhs = cov[ch, keep, 2] - sum(coef[ch, i] * cov[ch, keep, i] for i in fixed)
        sol = torch.linalg.lstsq(cov[ch][keep][:, keep], rhs.unsqueeze(1), driver="gelsd").solution[:, 0]
        coef[ch, keep] = sol
    offset = mean[:, 2] - coef[:, 0] * mean[:, 0] - coef[:, 1] * mean[:, 1]
    return coef[:, 0], coef[:, 1], -offset


def fit_candidates(moments: torch.Tensor, kinds: tuple[str, ...] = ("offset", "gain", "input")
         ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The candidate corrections ``kinds`` from the ``(C, 4, 4)`` moments, as ``(a, c, b)`` of ``y' = a y + c x - b``:

    * ``none``: ``a = 1, c = 0, b = 0``;
    * ``offset``: ``a = 1, c = 0, b = mean(q - f)``;
    * ``gain``: the least-squares line ``f ~ a q + d`` (``c = 0, b = -d``);
    * ``input``: the least-squares plane ``f ~ a q + c x + d`` (``b = -d``), i.e. the best linear estimate of
      the float output from the quantized output and the UNet's own input.
    """
    n = moments[:, 3, 3]
    ones, zeros = torch.ones_like(n), torch.zeros_like(n)
    make = {"none": lambda: (ones, zeros, zeros),
            "offset": lambda: (ones, zeros, (moments[:, 0, 3] - moments[:, 2, 3]) / n),
            "gain": lambda: _plane(moments, [0]), "input": lambda: _plane(moments, [0, 1])}
    return {kind: make[kind]() for kind in kinds}


def squared_error(moments: torch.Tensor, fit: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``sum |a q + c x - b - f|^2`` over channels and positions from the ``(..., C, 4, 4)`` moments of
    ``z = (q, x, f, 1)``: the residual is ``w . z`` with ``w = (a, c, -1, -b)``, so its square sums to
    ``w^T (sum z z^T) w`` per channel. Returns the leading dims ``(...)``."""
    a, c, b = fit
    w = torch.stack([a, c, -torch.ones_like(a), -b], dim=-1)  # (C, 4)
    return torch.einsum("ci,...cij,cj->...", w, moments, w)


def left_out_errors(moments: torch.Tensor, offered: tuple[str, ...]) -> tuple[torch.Tensor, float]:
    """Leave-one-trajectory-out errors of each candidate on one group.

    ``moments``: ``(P, C, 4, 4)`` per trajectory. For every trajectory ``j`` with rows, each offered candidate is
    fitted on the moments of all the others (``sum_k M_k - M_j``) and scored on ``j``'s own rows,
    ``e_j = w^T M_j w`` (:func:`squared_error`). Compared with one split into a fitting and a held-back half, every
    trajectory is scored once and every fit uses ``(P - 1) / P`` of the data, so the keep decision rests on twice
    the held-back rows and on fits close to the one that is applied.

    Returns ``(errors, values)``: ``errors`` ``(len(KINDS), P)`` float64, NaN for candidates not offered and for
    trajectories without rows; ``values`` the number of output values scored (rows x channels x positions).
    """
    total = moments.sum(0)
    errors = torch.full((len(KINDS), moments.shape[0]), float("nan"), dtype=torch.float64)
    for j in range(moments.shape[0]):
        if float(moments[j, :, 3, 3].sum()) == 0:
            continue
        fits = fit_candidates(total - moments[j], offered)
        for i, kind in enumerate(KINDS):
            if kind in offered:
                errors[i, j] = squared_error(moments[j], fits[kind])
    return errors, float(total[:, 3, 3].sum())
