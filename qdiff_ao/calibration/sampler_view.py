"""The UNet output as the sampler uses it: raw, or combined by classifier-free guidance.

A quantization error matters through what the sampler steps with. Without guidance that is the UNet output
``y``; with classifier-free guidance (scale ``s``) each step uses, from the two rows ``u`` (unconditional) and
``c`` (conditional) of one trajectory,

    f = y_u + s (y_c - y_u)                          so   f_q - f_fp = (1 - s) d_u + s d_c,   d = y_q - y_fp

With ``s = 3`` a quantizer's errors on the two halves reach the sample as ``-2 d_u + 3 d_c``: measured on the
raw rows, errors that guidance amplifies look 3-4x smaller than they are, and a quantizer that only hurts
the conditional half (e.g. the cross-attention of the class or text tokens) is missed if the measured rows
happen to be unconditional. The collector records the pairing (``CalibrationSet.guidance_pair``: ``-k`` on the
unconditional and ``+k`` on the conditional row of pair ``k``; the scale in ``metadata["guidance_scale"]``).
Measurements (sensitivity, precision fallback, output correction) take rows through :func:`timestep_rows` and
compare outputs through :meth:`RowGroup.sampler_output`, so they see the guided error.

The conditioning itself lives in the guidance difference ``g = y_c - y_u``, a few percent of ``y``: errors the two
rows share cancel in it, independent ones do not, so ``|g_q - g_fp| / |g_fp|`` can be many times the guided
error (:meth:`RowGroup.guidance_signal`; ``sensitivity(..., target="guidance")`` ranks quantizers by it).

    >>> import torch
    >>> from qdiff_ao.calibration.calibration_set import CalibrationSet
    >>> calib = CalibrationSet(torch.zeros(4, 1, 2, 2), torch.full((4,), 7), guidance_pair=torch.tensor([-1, -2, 1, 2]),
    ...                        metadata={"guidance_scale": "3.0"})
    >>> group = timestep_rows(calib, 7)
    >>> group.index.tolist(), group.pairs
    ([0, 1, 2, 3], 2)
    >>> group.sampler_output(torch.tensor([0.0, 1.0, 1.0, 1.0])).tolist()   # u + 3 (c - u)
    [3.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.distributed import deal, sum_over_ranks

__all__ = [
    "TARGETS", "ErrorProbe", "RowGroup", "guidance_pairs", "guidance_scale", "per_timestep_error", "timestep_rows",
]


def guidance_scale(calib: CalibrationSet) -> float | None:
    """The set's classifier-free guidance scale, or ``None`` if its rows are not recorded as guidance pairs."""
    if calib.guidance_pair is None:
        return None
    return float(calib.metadata["guidance_scale"])


@dataclass(frozen=True)
class RowGroup:
    """Rows of one timestep to run together, and how their outputs combine into what the sampler uses.

    Attributes:
        index: rows of the calibration set; with guidance ``[u_1 .. u_P, c_1 .. c_P]`` (pair ``i`` = ``u_i, c_i``).
        pairs: ``P`` with guidance, else ``None``.
        scale: the guidance scale ``s`` (``None`` without guidance).
    """

    index: torch.Tensor
    pairs: int | None = None
    scale: float | None = None

    def __len__(self) -> int:
        return int(self.index.numel())

    def sampler_output(self, y: torch.Tensor) -> torch.Tensor:
        """``y`` (outputs of :attr:`index`, in order) as the sampler uses it: ``y_u + s (y_c - y_u)`` per pair."""
        if self.pairs is None or self.scale is None:
            return y
        uncond, cond = y[: self.pairs], y[self.pairs : 2 * self.pairs]
        return uncond + self.scale * (cond - uncond)

    def guidance_signal(self, y: torch.Tensor) -> torch.Tensor:
        """The guidance difference ``y_c - y_u`` per pair (what carries the conditioning).

        Raises:
            ValueError: the group holds no guidance pairs.
        """
        if self.pairs is None:
            raise ValueError("the guidance signal y_c - y_u needs guidance pairs; this calibration set records none "
                             "(collect it with negative_encoder_hidden_states= and guidance_scale= > 1)")
        return y[self.pairs : 2 * self.pairs] - y[: self.pairs]

    def split(self) -> tuple[RowGroup, RowGroup]:
        """Two halves by trajectory (pairs stay whole): the first ``floor(P/2)`` pairs or rows, and the rest."""
        if self.pairs is None:
            half = len(self) // 2
            return RowGroup(self.index[:half]), RowGroup(self.index[half:])
        p, half = self.pairs, self.pairs // 2
        uncond, cond = self.index[:p], self.index[p:]
        first = RowGroup(torch.cat([uncond[:half], cond[:half]]), half, self.scale)
        second = RowGroup(torch.cat([uncond[half:], cond[half:]]), p - half, self.scale)
        return first, second


def timestep_rows(calib: CalibrationSet, timestep: int | float | torch.Tensor, limit: int | None = None) -> RowGroup:
    """The rows of ``timestep`` in stored order, as guidance pairs when the set records them.

    Args:
        calib: the calibration set.
        timestep: one of ``calib.timesteps()``.
        limit: at most this many rows (without guidance) or pairs (with guidance); ``None``: all.

    Raises:
        ValueError: if the set records guidance pairs but a row of ``timestep`` has no partner there (a set
            cut through pairs: select rows by trajectory, keeping both halves).
    """
    rows = torch.nonzero(calib.timestep == timestep).flatten()
    scale = guidance_scale(calib)
    if scale is None or calib.guidance_pair is None:
        return RowGroup(rows[:limit] if limit is not None else rows)
    ids = calib.guidance_pair[rows]
    uncond = rows[ids < 0]
    cond_by_id = {int(i): int(r) for i, r in zip(ids[ids > 0].tolist(), rows[ids > 0].tolist(), strict=True)}
    partners = [cond_by_id.get(-int(i)) for i in calib.guidance_pair[uncond].tolist()]
    if None in partners or len(partners) != len(cond_by_id):
        raise ValueError(f"timestep {timestep}: the set records classifier-free guidance pairs (guidance_pair) but "
                         f"{len(uncond)} unconditional and {len(cond_by_id)} conditional rows do not pair up; keep "
                         "both rows of every pair when cutting a calibration set")
    n = len(partners) if limit is None else min(limit, len(partners))
    cond = torch.tensor(partners[:n], dtype=torch.long)
    return RowGroup(torch.cat([uncond[:n], cond]), n, scale)


TARGETS = ("sampler", "guidance")
"""What an error is measured on: the sampler's output (guided with guidance), or the guidance signal alone."""


def per_timestep_error(out: torch.Tensor, ref: torch.Tensor, groups: list[RowGroup],
                       target: str = "sampler") -> tuple[float, ...]:
    """``||f(out) - f(ref)||_F / ||f(ref)||_F`` per group, ``f`` = :meth:`RowGroup.sampler_output` (``target=
    "sampler"``) or :meth:`RowGroup.guidance_signal` (``"guidance"``).

    ``out`` and ``ref`` hold the outputs of the groups' rows concatenated in group order.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    errors = []
    counts = [len(g) for g in groups]
    for o, r, g in zip(out.split(counts), ref.split(counts), groups, strict=True):
        f = g.sampler_output if target == "sampler" else g.guidance_signal
        o, r = f(o), f(r)
        errors.append(float((o - r).double().norm() / r.double().norm().clamp_min(1e-12)))
    return tuple(errors)


def guidance_pairs(calib: CalibrationSet) -> torch.Tensor | None:
    """``[P, 2]`` row indices ``(u, c)`` of every guidance pair (timesteps ascending, stored order), or ``None``."""
    if guidance_scale(calib) is None:
        return None
    groups = [timestep_rows(calib, t) for t in calib.timesteps()]
    return torch.cat([torch.stack([g.index[: g.pairs], g.index[g.pairs :]], dim=1) for g in groups])


class ErrorProbe:
    """Per-timestep output error on at most ``limit`` rows (or guidance pairs) of every calibration timestep.

    On a process group the timesteps are dealt round-robin (:func:`~qdiff_ao.calibration.distributed.deal`):
    each rank runs only its timesteps' rows (:attr:`inputs`; ``None`` if it has none) and :meth:`errors` adds the
    ranks' per-timestep errors up -- each entry comes from one rank, the others add 0.0, so the result is exact
    and the same on every rank.

    Attributes:
        timesteps: all calibration timesteps, ascending.
        inputs: UNet keyword inputs of this rank's rows (groups concatenated in timestep order), or ``None``.
    """

    def __init__(self, calib: CalibrationSet, limit: int) -> None:
        all_t = calib.timesteps()
        self.timesteps = [float(t) for t in all_t]
        self._mine = deal(len(all_t))
        self._groups = [timestep_rows(calib, all_t[i], limit) for i in self._mine]
        self.inputs = calib._rows(torch.cat([g.index for g in self._groups])) if self._groups else None

    def outputs(self, forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                batch_size: int | None = None) -> torch.Tensor | None:
        """``forward`` on this rank's rows (:attr:`inputs`, ``batch_size`` rows at a time; all at once if
        ``None``), concatenated; ``None`` when this rank has no timesteps (more ranks than timesteps)."""
        if self.inputs is None:
            return None
        n = self.inputs["sample"].shape[0]
        step = batch_size or n
        return torch.cat([forward({k: v[start:start + step] for k, v in self.inputs.items()})
                          for start in range(0, n, step)])

    def errors(self, out: torch.Tensor | None, ref: torch.Tensor | None, target: str = "sampler"
               ) -> tuple[float, ...]:
        """:func:`per_timestep_error` of this rank's outputs, completed over the ranks (one entry per timestep)."""
        full = [0.0] * len(self.timesteps)
        if self._groups:
            assert out is not None and ref is not None
            for i, e in zip(self._mine, per_timestep_error(out, ref, self._groups, target), strict=True):
                full[i] = e
        return tuple(sum_over_ranks(full))
