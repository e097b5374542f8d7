"""Mergeable histograms on power-of-two grids, the statistics behind the Lp range search.

Each row (one per channel, or a single row per tensor) covers the symmetric interval [-R, R) with ``n`` equal
bins, where R is a power of two strictly larger than every |x| seen. A batch that needs a larger range doubles R;
doubling merges bin pairs exactly:

    new_bin = (old_bin + n/2) // 2          (grid [-R, R) -> [-2R, 2R))

so the histogram after any sequence of batches is the one a single batch with all the data would give: the
statistics are exactly batch-order invariant (counts are integers held in float64).
"""

from __future__ import annotations

import math

import torch

__all__ = ["pow2_bound", "update_histogram", "rebin_histogram", "bin_centers"]

_MIN_EXP = -126  # float32's smallest normal exponent: the grid of an all-zero tensor


def pow2_bound(absmax: torch.Tensor) -> torch.Tensor:
    """Smallest power of two R with R > absmax (elementwise), at least 2**-126."""
    absmax = absmax.double().clamp(min=2.0**_MIN_EXP)
    return torch.exp2(torch.floor(torch.log2(absmax)) + 1)


def _double(hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Merge bin pairs of the rows in ``mask`` (their range doubles)."""
    n = hist.shape[1]
    idx = torch.arange(n, device=hist.device).expand_as(hist)
    new_idx = torch.where(mask[:, None], (idx + n // 2) // 2, idx)
    return torch.zeros_like(hist).scatter_add_(1, new_idx, hist)


_CHUNK = 1 << 18  # values binned per step: intermediates this small are reused by the allocator, not re-mapped


def update_histogram(
    hist: torch.Tensor, bound: torch.Tensor, rows: torch.Tensor, absmax: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the values of ``rows`` (C, N) to ``hist`` (C, n) on grids ``bound`` (C,); returns (hist, bound).

    A row's bound of 0 means the row is empty (no grid yet). ``absmax`` (C,): max |x| per row when the caller
    already has it (computed here otherwise).

    Each value goes to bin ``floor((x + R) / width)`` (float64, clamped to [0, n - 1]), ``width = 2 R / n``.
    """
    c, n = hist.shape
    if absmax is None:
        lo, hi = torch.aminmax(rows, dim=1)
        absmax = torch.maximum(-lo, hi)
    need = pow2_bound(absmax.reshape(c))
    new_bound = torch.where(bound > 0, torch.maximum(bound, need), need)
    hist = rebin_histogram(hist, bound, new_bound)  # rows that already had data: exact doubling
    width = 2.0 * new_bound / n
    offset = torch.arange(c, device=rows.device)[:, None] * n  # bincount over row-offset bins counts every row
    counts = torch.zeros(c * n, dtype=torch.int64, device=rows.device)
    # in place and in column chunks: a calibration pass spent most of its observer time allocating full-size
    # float64 / int64 copies of every activation; the integer counts are exactly those of one pass
    step = max(1, _CHUNK // c)
    for start in range(0, rows.shape[1], step):
        part = rows[:, start:start + step].double().add_(new_bound[:, None]).div_(width[:, None])
        idx = part.floor_().long().clamp_(0, n - 1).add_(offset)
        counts += torch.bincount(idx.reshape(-1), minlength=c * n)
    return hist + counts.reshape(c, n).to(hist.dtype), new_bound


def rebin_histogram(hist: torch.Tensor, bound: torch.Tensor, new_bound: torch.Tensor) -> torch.Tensor:
    """``hist`` on grids ``bound`` re-binned exactly onto the larger power-of-two grids ``new_bound`` (C,).

    Rows with ``bound == 0`` (no data) stay empty. After re-binning two histograms of disjoint data onto the
    same grids, their sum is the histogram of the union: this is how ranks of a process group merge statistics.

    Raises:
        ValueError: a non-empty row's new bound is smaller than its bound, or not a power-of-two multiple of it.
    """
    has_data = bound > 0
    ratio = torch.where(has_data, new_bound / bound.clamp(min=2.0**_MIN_EXP), torch.ones_like(bound))
    # ratio = 0.5 * 2**exponent exactly iff it is a power of two; frexp is exact where CUDA's log2 is not
    mantissa, exponent = torch.frexp(ratio)
    steps = exponent - 1
    if bool((steps < 0).any()) or bool((mantissa != 0.5).any()):
        raise ValueError(f"rebin_histogram: new bounds {new_bound.tolist()} must be bounds {bound.tolist()} times a "
                         "power of two >= 1")
    n = hist.shape[1]
    # at most log2(n) + 1 doublings change anything (afterwards every value sits in one of the two central bins)
    for k in range(min(int(steps.max().item()) if steps.numel() else 0, int(math.log2(n)) + 1)):
        hist = _double(hist, steps > k)
    return hist


def bin_centers(bound: torch.Tensor, n: int) -> torch.Tensor:
    """Centers (C, n) of the bins of grids [-R, R) with n bins."""
    width = 2.0 * bound / n
    return -bound[:, None] + (torch.arange(n, dtype=torch.float64, device=bound.device)[None, :] + 0.5) * width[:, None]
