"""Refuse a checkpoint whose config describes a far larger model than its tensor file holds, before allocating.

Loading rebuilds the float model its ``config.json`` names, then overwrites every tensor from the file. A crafted
config (``block_out_channels=[768, 1536]``, ``layers_per_block=10**6``) next to a small tensor file would make that
rebuild allocate gigabytes or run for minutes. Two checks run first, each cheap:

1. counts in the config are bounded by what the file stores: every resnet or transformer layer stores at least
   four tensors (two weights, two biases), so ``4 * layers <= tensors in the file``, where ``layers`` counts
   ``layers_per_block`` (and ``transformer_layers_per_block``) over the down and up blocks; and
   every width ``c`` of ``block_out_channels`` has ``c**2 <= 4 * (elements stored)`` (each level holds a c -> c
   convolution of 9 c**2 weights);
2. the model built on the ``meta`` device (shapes only, no memory) must have at most
   ``4 * (elements stored) + slack`` parameter elements: every parameter the graph uses is stored, as int8 codes
   (one element each), packed int4 codes (two per byte) or float, so its count is at most twice the stored
   elements; the other factor 2 leaves room for parameters a model holds but its traced graph never uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qdiff_ao.deploy.checkpoint.tensor_layout import CheckpointError

__all__ = ["check_model_fits_file"]

_COUNT_KEYS = ("layers_per_block", "transformer_layers_per_block")
_BLOCK_KEYS = ("down_block_types", "up_block_types")
_SLACK = 4096  # elements: buffers and the like a model may hold without storing them


def _total(value: Any) -> int:
    """Sum of the integers in ``value`` (an int or nested lists of ints); anything else counts 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return abs(value)
    if isinstance(value, (list, tuple)):
        return sum(_total(v) for v in value)
    return 0


def check_model_fits_file(cls: type[Any], config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                          where: str) -> None:
    """Raise :class:`CheckpointError` if ``cls(**config)`` cannot be the model whose tensors are ``tensors``.

    Runs before the model is allocated; see the module docstring for the two checks.
    """
    stored_tensors = len(tensors)
    stored_elements = sum(t.numel() for t in tensors.values())
    blocks = sum(len(v) for key in _BLOCK_KEYS if isinstance(v := config.get(key), (list, tuple)))
    per_block = [config.get(key) for key in _COUNT_KEYS]
    # an int applies to every block; a list names one count per block (up blocks hold one more each)
    layers = sum(_total(v) * (blocks if isinstance(v, int) else 2) + blocks for v in per_block if _total(v))
    counted = 4 * layers
    if counted > stored_tensors:
        raise CheckpointError(
            f"{where}: the config describes a model of at least {layers} layers (>= {counted} stored tensors), but the "
            f"tensor file holds {stored_tensors}; the config was edited or belongs to another model"
        )
    widest = max((c for c in config.get("block_out_channels") or () if isinstance(c, int)), default=0)
    if widest**2 > 4 * stored_elements + _SLACK:
        raise CheckpointError(
            f"{where}: the config's block_out_channels reach {widest} channels, whose convolutions alone need more "
            f"weights than the {stored_elements:,} elements the tensor file stores; the config was edited or "
            "belongs to another model"
        )
    try:
        with torch.device("meta"):
            skeleton = cls.from_config(dict(config))
    except Exception as err:  # diffusers refuses the config: report it as a bad checkpoint
        raise CheckpointError(f"{where}: cannot build {cls.__name__} from the recorded config ({type(err).__name__}: "
                              f"{err})") from err
    needed = sum(p.numel() for p in skeleton.parameters())
    if needed > 4 * stored_elements + _SLACK:
        raise CheckpointError(
            f"{where}: the config describes a {cls.__name__} of {needed:,} parameters, but the tensor file stores "
            f"{stored_elements:,} elements; the config was edited or belongs to another model"
        )
