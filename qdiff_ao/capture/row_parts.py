"""Running a batch whose rows need different models (timestep groups, the float tail), part by part.

UNet rows are independent, so a batch can be cut by a per-row label, each part run on its own model and the
outputs put back in the rows' order: ``out[rows(p)] = run(p, inputs[rows(p)])`` for every label ``p``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["run_by_part"]


def run_by_part(inputs: Mapping[str, Any], part: torch.Tensor,
                run: Callable[[int, dict[str, Any]], torch.Tensor]) -> torch.Tensor:
    """``run(label, rows' inputs)`` for each distinct label of ``part`` (one per row), outputs in row order.

    Inputs whose first dimension is the batch are cut; other values (0-d tensors, non-tensors) pass whole. A batch
    with one label runs uncut.
    """
    labels = part.reshape(-1)
    if labels.numel() <= 1 or bool((labels == labels[0]).all()):
        return run(int(labels[0]), dict(inputs))
    n, parts = labels.shape[0], []
    for label in labels.unique().tolist():
        rows = (labels == label).nonzero().flatten()
        sub = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
               for k, v in inputs.items()}
        parts.append((rows, run(int(label), sub)))
    out = parts[0][1].new_empty((n, *parts[0][1].shape[1:]))
    for rows, y in parts:
        out[rows] = y
    return out
