"""Feed a calibration set through a prepared model, so its observers see every timestep's activations.

:func:`calibrate` runs each timestep's rows under ``timestep_context(t)`` (timestep-aware observers keep per-step
statistics) and, under a process group, merges the observers' statistics exactly across ranks.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from tqdm import tqdm

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.distributed import init_from_environment, rank_and_world
from qdiff_ao.capture.devices import module_device, to_device
from qdiff_ao.observers.merging import all_reduce_observers
from qdiff_ao.observers.timestep_context import timestep_context

__all__ = ["calibrate"]

logger = logging.getLogger(__name__)


def _accepted_inputs(model: Any) -> tuple[set[str], set[str]] | None:
    """(accepted, required) keyword names of ``model.forward``, or None if it takes ``**kwargs``."""
    try:
        params = inspect.signature(model.forward if hasattr(model, "forward") else model).parameters
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    accepted = {n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}
    required = {
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    }
    return accepted, required


def calibrate(model: Any, calib: CalibrationSet, *, batch_size: int = 32, progress: bool = True) -> None:
    """Feed every row of ``calib`` through ``model`` so its observers see each timestep.

    For each timestep ``t`` (decreasing) and each batch of rows with that ``t``:
    ``with timestep_context(t): model(**inputs)`` under ``torch.no_grad``, with inputs moved to the model's
    device. The model's train/eval mode is left as it is.

    Under a torch.distributed process group of N > 1 ranks, batch ``b`` runs on rank ``b mod N`` (a set from
    ``keep_shards=True`` is fed whole: it already is this rank's share), then every observer's statistics are
    merged exactly across ranks (:func:`qdiff_ao.observers.merging.all_reduce_observers`): each rank ends with
    the qparams one process computes on the whole set.

    Args:
        model: a callable module taking UNet keyword inputs: a prepared ``torch.fx.GraphModule`` whose
            placeholders are named ``sample``, ``timestep``, ... or a plain diffusers UNet.
        calib: the :class:`CalibrationSet` to feed.
        batch_size: maximum rows per forward pass.
        progress: show a tqdm bar.

    Raises:
        TypeError: if ``model`` is not callable or ``calib`` is not a :class:`CalibrationSet`.
        ValueError: if ``batch_size < 1`` or ``model`` does not take the set's inputs (e.g. it was traced
            without ``encoder_hidden_states``).
        TypeError: under a process group, an observer whose statistics cannot be merged exactly (EMA).
    """
    if not isinstance(calib, CalibrationSet):
        raise TypeError(f"calib must be a CalibrationSet (from collect_calibration_data), got {type(calib).__name__}")
    if not callable(model):
        raise TypeError(f"model must be a callable module, got {type(model).__name__}")
    keys = set(calib.example_inputs(1))
    signature = _accepted_inputs(model)
    if signature is not None:
        accepted, required = signature
        if keys - accepted or required - keys:
            raise ValueError(
                f"model takes inputs {sorted(accepted)} (required {sorted(required)}) but the calibration set "
                f"provides {sorted(keys)}; trace/prepare the model with calib.example_inputs() of this set"
            )
    device = module_device(model) if isinstance(model, torch.nn.Module) else torch.device("cpu")
    init_from_environment()
    rank, world = rank_and_world()
    deal = world > 1 and "shard" not in calib.metadata
    total = calib.num_batches(batch_size)
    bar = tqdm(total=total, disable=not progress or rank != 0, desc="calibrate", unit="batch")
    with torch.no_grad(), bar:
        for b, (t, inputs) in enumerate(calib.batches(batch_size)):
            if not deal or b % world == rank:
                with timestep_context(t):
                    model(**to_device(inputs, device))
            bar.update(1)
    if world > 1 and isinstance(model, torch.nn.Module):
        all_reduce_observers(model)
    logger.info("calibrated on %d rows, %d timesteps, %d batches", len(calib), len(calib.timesteps()), total)
