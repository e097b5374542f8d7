"""Calibration on a torch.distributed process group (launched by ``torchrun``): who runs what, and sharing rows.

Without an initialised process group (and without torchrun's environment) everything here is the identity:
rank 0 of a world of 1. Under ``torchrun --nproc_per_node=N`` the default group is initialised from the
environment on first use (:func:`init_from_environment`: gloo, also on GPU machines; a timeout, so a rank that
dies makes the others fail instead of waiting forever), and

* calibration trajectories are cut into chunks of ``batch_size``; chunk ``c`` runs on rank ``c mod N`` from its
  own generator, seeded ``seed + c * 2**32`` (chunk 0: ``seed``, as one process always did), so the set does not
  depend on how many ranks produced it. Each chunk's rows are then broadcast from their rank, an exact copy:
  every rank ends with the single-process set, row for row;
* calibration batches are dealt round-robin (batch ``b`` on rank ``b mod N``) and the observers' statistics are
  merged exactly afterwards (:func:`qdiff_ao.observers.merging.all_reduce_observers`);
* per-timestep measurements (sensitivity, precision fallback, output correction) deal calibration timesteps
  round-robin (:func:`deal`) and add their results up with :func:`sum_over_ranks`.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_TIMEOUT_S", "chunk_seed", "deal", "init_from_environment", "is_main_process", "rank_and_world",
           "run_on_main_process", "sum_over_ranks", "sum_tensor_over_ranks"]

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
"""Seconds a collective waits for the other ranks (override: environment variable ``QDIFF_AO_DIST_TIMEOUT_S``)."""


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the rank that writes files and shows progress."""
    return rank_and_world()[0] == 0


def deal(count: int) -> list[int]:
    """This rank's share of ``count`` items dealt round-robin: item ``i`` on rank ``i mod N`` (possibly none)."""
    rank, world = rank_and_world()
    return list(range(rank, count, world))


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of ``values`` over the ranks, in float64 (identity in one process). Entries only one rank
    fills (the others add 0.0) come back exactly."""
    if rank_and_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def sum_tensor_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (a new tensor; ``t`` itself in one process)."""
    if rank_and_world()[1] == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def init_from_environment() -> bool:
    """Initialise the default process group from torchrun's environment; True if a group with > 1 rank exists.

    Reads ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` (set by torchrun); does nothing when a
    group is already initialised or ``WORLD_SIZE`` is absent or 1.

    Raises:
        ValueError: ``QDIFF_AO_DIST_TIMEOUT_S`` is not a positive number.
    """
    if not dist.is_available():
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    raw = os.environ.get("QDIFF_AO_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        timeout = float(raw)
    except ValueError:
        timeout = -1.0
    if not timeout > 0:
        raise ValueError(f"QDIFF_AO_DIST_TIMEOUT_S must be a positive number of seconds, got {raw!r}")
    # gloo even where CUDA exists: the calibration rows and the per-timestep sums are CPU tensors, which NCCL
    # cannot reduce or broadcast, and gloo also all-reduces the CUDA tensors of a model on a GPU. A user who
    # wants NCCL initialises the group before calling qdiff_ao (an initialised group is used as it is).
    backend = "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
    logger.info("process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_world_size() > 1


def chunk_seed(seed: int, chunk: int) -> int:
    """Seed of the generator of calibration chunk ``chunk``: ``seed + chunk * 2**32`` (chunk 0: ``seed``)."""
    return seed + (chunk << 32)


def run_on_main_process(action: Callable[[], None]) -> bool:
    """Run ``action()`` on rank 0 (and without a process group) only; True where it ran.

    No collective is involved, so both usual patterns work under torchrun: every rank calling (only rank 0
    acts) and ``if rank == 0:`` around the call (a collective there would wait forever for the other ranks).
    """
    if not is_main_process():
        return False
    action()
    return True
