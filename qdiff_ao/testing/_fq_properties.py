"""The fake-quant properties shared by observer and fake-quant checks, stated on one quantization grid.

A grid is (scale s, zero point z, [quant_min, quant_max], ch_axis) plus the fake-quant function that applies it:

    fq(x) = (clamp(round(x / s) + z, quant_min, quant_max) - z) * s

    range         c = fq(x) / s + z is an integer in [quant_min, quant_max]
    round_trip    |fq(x) - x| <= s/2 + slack for x in [(quant_min - z) s, (quant_max - z) s]
    idempotence   fq(fq(x)) == fq(x) exactly
    monotonicity  x1 <= x2  =>  fq(x1) <= fq(x2)
    zero          fq(0) == 0 exactly

round_trip and idempotence are checked on the input and on probe points (the range ends and points a fraction
f in {0.25, 0.45, 0.5, 0.55, 0.75} of a step above the lowest code, the highest and the code of 0).

slack = 8 * eps_fp32 * max(|x|, |(quant_min - z) s|, |(quant_max - z) s|): float32 rounding of x / s and of the
product (q - z) * s, proportional to the magnitudes involved (never a fixed fraction of s).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qdiff_ao.testing.report import _Fail, fmt_tensor

__all__: list[str] = []

_EPS32 = float(torch.finfo(torch.float32).eps)


@dataclass
class Grid:
    """Per-channel view of one quantization grid; per-tensor grids have one channel."""

    scale: torch.Tensor  # float32, shape (C,)
    zero_point: torch.Tensor  # float64, shape (C,)
    quant_min: int
    quant_max: int
    ch_axis: int | None
    fq: Callable[[torch.Tensor], torch.Tensor]

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """t as (C, N) float64: channel ``ch_axis`` first, the rest flattened."""
        if self.ch_axis is None:
            return t.reshape(1, -1).double()
        return t.movedim(self.ch_axis, 0).reshape(t.shape[self.ch_axis], -1).double()

    def unrows(self, r: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Inverse of ``rows`` (back to float32 in the layout of ``like``)."""
        if self.ch_axis is None:
            return r.reshape(like.shape).float()
        moved = list(like.movedim(self.ch_axis, 0).shape)
        return r.reshape(moved).movedim(0, self.ch_axis).float().contiguous()

    @property
    def s64(self) -> torch.Tensor:
        return self.scale.double().reshape(-1, 1)

    @property
    def z64(self) -> torch.Tensor:
        return self.zero_point.double().reshape(-1, 1)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The representable interval per channel, (C, 1) float64: [(quant_min - z) s, (quant_max - z) s]."""
        return (self.quant_min - self.z64) * self.s64, (self.quant_max - self.z64) * self.s64

    def describe(self) -> str:
        return (
            f"qparams: scale={fmt_tensor(self.scale)}, zero_point={fmt_tensor(self.zero_point)}, "
            f"quant_min={self.quant_min}, quant_max={self.quant_max}, ch_axis={self.ch_axis}"
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fq(x)
        if not isinstance(y, torch.Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise _Fail(f"the fake quant returned {got} for an input of shape {tuple(x.shape)}; expected that shape")
        return y


def _channel(grid: Grid, c: int) -> str:
    return f" (channel {c} on ch_axis={grid.ch_axis})" if grid.ch_axis is not None else ""


def check_range(grid: Grid, x: torch.Tensor, context: str) -> None:
    """fq(x) / s + z must be an integer code in [quant_min, quant_max]."""
    y = grid.rows(grid.apply(x))
    steps = y / grid.s64
    codes = steps + grid.z64
    tol = 16 * _EPS32 * (steps.abs() + grid.z64.abs() + 1)  # y is float32: relative error eps in y / s
    off_grid = ~((codes - codes.round()).abs() <= tol)
    outside = (codes.round() < grid.quant_min) | (codes.round() > grid.quant_max)
    for bad, what in ((off_grid, "is not an integer code"), (outside, "is outside [quant_min, quant_max]")):
        if bool(bad.any()):
            c, i = (int(v) for v in bad.nonzero()[0])
            xr = grid.rows(x)
            raise _Fail(
                f"{context}\n{grid.describe()}\noffending value{_channel(grid, c)}: x={xr[c, i].item():.9g} -> "
                f"fq(x)={y[c, i].item():.9g}, code fq(x)/scale + zero_point={codes[c, i].item():.9g} {what}"
            )


def _probes(grid: Grid, x: torch.Tensor) -> list[torch.Tensor]:
    """Inputs shaped like x, constant per channel, inside the representable range: the range ends, and points at
    k + f steps for f in {0.25, 0.45, 0.5, 0.55, 0.75} next to the lowest code, the highest and the code of 0.

    Data alone rarely lands where a rounding-offset bug shows (e.g. floor(x/s + 0.6) errs only for fractional
    parts in [0.4, 0.5)); these points make such bugs visible in every example.
    """
    s, z = grid.s64, grid.z64
    qmin, qmax = grid.quant_min, grid.quant_max
    steps = [torch.full_like(z, qmin), torch.full_like(z, qmax)]
    for base in (
        torch.full_like(z, qmin),
        torch.full_like(z, qmax - 1),
        (z - 1).clamp(qmin, qmax - 1),
        z.clamp(qmin, qmax - 1),
    ):
        steps += [base + f for f in (0.25, 0.45, 0.5, 0.55, 0.75)]
    n = grid.rows(x).shape[1]
    return [grid.unrows(((k - z) * s).expand(-1, n), x) for k in steps]


def check_round_trip(grid: Grid, x: torch.Tensor, context: str) -> None:
    """|fq(x) - x| <= s/2 + slack for every x inside the representable interval (data and probe points)."""
    lo, hi = grid.bounds()
    for inp in [x, *_probes(grid, x)]:
        xr = grid.rows(inp)
        inside = (xr >= lo) & (xr <= hi)
        if not bool(inside.any()):
            continue
        yr = grid.rows(grid.apply(inp))
        err = (yr - xr).abs()
        slack = 8 * _EPS32 * torch.maximum(xr.abs(), torch.maximum(lo.abs(), hi.abs()))
        allowed = grid.s64 / 2 + slack
        bad = inside & ~(err <= allowed)
        if bool(bad.any()):
            c, i = (int(v) for v in bad.nonzero()[0])
            raise _Fail(
                f"{context}\n{grid.describe()}\noffending value{_channel(grid, c)}"
                f"{'' if inp is x else ' (probe point)'}: x={xr[c, i].item():.9g} inside "
                f"[{lo[c, 0].item():.9g}, {hi[c, 0].item():.9g}] -> fq(x)={yr[c, i].item():.9g}, error "
                f"{err[c, i].item():.9g} > scale/2 + slack = {allowed[c, i].item():.9g}"
            )


def check_idempotence(grid: Grid, x: torch.Tensor, context: str) -> None:
    """fq(fq(x)) == fq(x), bit for bit: the grid points are fixed points (data and probe points)."""
    for inp in [x, *_probes(grid, x)]:
        y = grid.apply(inp)
        y2 = grid.apply(y.clone())
        bad = ~(grid.rows(y2) == grid.rows(y))
        if bool(bad.any()):
            c, i = (int(v) for v in bad.nonzero()[0])
            raise _Fail(
                f"{context}\n{grid.describe()}\noffending value{_channel(grid, c)}"
                f"{'' if inp is x else ' (probe point)'}: x={grid.rows(inp)[c, i].item():.9g} -> "
                f"fq(x)={grid.rows(y)[c, i].item():.9g} -> fq(fq(x))={grid.rows(y2)[c, i].item():.9g}"
            )


def check_monotonicity(grid: Grid, x: torch.Tensor, context: str) -> None:
    """Within each channel, sorted inputs give non-decreasing outputs."""
    xs = grid.rows(x).sort(dim=1).values
    ys = grid.rows(grid.apply(grid.unrows(xs, x)))
    bad = ~(ys[:, 1:] >= ys[:, :-1])
    if bool(bad.any()):
        c, i = (int(v) for v in bad.nonzero()[0])
        raise _Fail(
            f"{context}\n{grid.describe()}\noffending pair{_channel(grid, c)}: x1={xs[c, i].item():.9g} <= "
            f"x2={xs[c, i + 1].item():.9g} but fq(x1)={ys[c, i].item():.9g} > fq(x2)={ys[c, i + 1].item():.9g}"
        )


def check_zero(grid: Grid, x: torch.Tensor, context: str) -> None:
    """fq(0) == 0 exactly in every channel (zero padding and ReLU zeros must survive quantization)."""
    y = grid.rows(grid.apply(torch.zeros_like(x)))
    bad = ~(y == 0)
    if bool(bad.any()):
        c, i = (int(v) for v in bad.nonzero()[0])
        raise _Fail(f"{context}\n{grid.describe()}\noffending value{_channel(grid, c)}: fq(0)={y[c, i].item():.9g}")


FQ_CHECKS: dict[str, Callable[[Grid, torch.Tensor, str], None]] = {
    "range": check_range,
    "round_trip": check_round_trip,
    "idempotence": check_idempotence,
    "monotonicity": check_monotonicity,
    "zero": check_zero,
}
