"""Block reconstruction on a torch.distributed process group: rows split across ranks, gradients averaged.

With N > 1 ranks (``qdiff_ao.calibration.distributed.rank_and_world``):

* rows: the seeded selection of ``n`` cached rows is dealt out, rank ``r`` keeping rows ``r, r + N, ...`` of it
  (a set kept as shards, ``collect_calibration_data(keep_shards=True)``, supplies this rank's own rows), so each
  rank caches about ``n / N`` rows of block inputs and outputs: ``max_cache_bytes`` is per rank;
* mini-batches: each rank draws ``ceil(batch_size / N)`` of its rows per iteration from a generator seeded by the
  block and the rank, runs forward/backward, and the gradients are averaged with ``all_reduce``: every rank
  applies the same Adam step to the same parameters, so all ranks stay identical (the optimiser sees the mean
  loss over the N per-rank batches; the regulariser, the same on every rank, keeps its weight);
* decisions (AdaRound or nearest rounding, learned or calibrated step sizes) compare errors summed over every
  rank's rows (``all_reduce``), so every rank takes the same one.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from qdiff_ao.calibration.distributed import rank_and_world, sum_over_ranks

__all__ = ["average_gradients", "ranks_batch_size", "rows_to_cache", "sum_over_ranks"]


def _select_rows(n_total: int, n: int, seed: int) -> torch.Tensor:
    """``n`` distinct rows of ``n_total`` drawn with a seeded generator, sorted (all rows if ``n >= n_total``)."""
    if n >= n_total:
        return torch.arange(n_total)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].sort().values


def rows_to_cache(n_total: int, n_per_rank: int, seed: int, sharded: bool,
                  units: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(this rank's calibration rows to cache, rows cached over all ranks).

    One process: ``n_per_rank`` seeded rows. N ranks sharing a gathered set: ``min(n_total, N * n_per_rank)``
    seeded rows, dealt out (rank ``r`` keeps ``r, r + N, ...``). A shard: this rank's own seeded selection.
    ``units`` (``[U, k]``): rows that stay together, in this order -- classifier-free guidance pairs ``[u, c]``;
    selection and dealing are then over units (``n_per_rank // k`` per rank) and their rows come out interleaved.
    """
    units = torch.arange(n_total).unsqueeze(1) if units is None else units
    k = units.shape[1]
    picked, total = _units_to_cache(units.shape[0], n_per_rank // k, seed, sharded)
    return units[picked].flatten(), total * k


def _units_to_cache(n_total: int, n_per_rank: int, seed: int, sharded: bool) -> tuple[torch.Tensor, int]:
    rank, world = rank_and_world()
    if world == 1:
        return _select_rows(n_total, n_per_rank, seed), min(n_total, n_per_rank)
    if sharded:
        rows = _select_rows(n_total, n_per_rank, seed)
    else:
        rows = _select_rows(n_total, min(n_total, world * n_per_rank), seed)[rank::world]
    return rows, int(sum_over_ranks([float(len(rows))])[0])


def ranks_batch_size(batch_size: int) -> int:
    """Rows per rank and iteration: ``ceil(batch_size / N)``."""
    return max(1, math.ceil(batch_size / rank_and_world()[1]))


def average_gradients(params: list[torch.Tensor]) -> None:
    """Replace each parameter's gradient by its mean over the ranks (no-op in one process)."""
    world = rank_and_world()[1]
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        p.grad.div_(world)
