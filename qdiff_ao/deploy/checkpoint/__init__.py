"""Compressed checkpoints: real integer weights (4-bit codes packed two per byte), qparams, and a JSON config.

- ``archive``: :func:`save_graph` / :func:`load_graph` (the rebuild of the graph from the config); users call
  ``QuantizedUNet.save_pretrained`` / ``from_pretrained`` (or the ``qdiff_ao.save`` / ``load`` aliases).
- ``tensor_layout``: which tensor of a converted graph goes where in ``model.safetensors``.
- ``files``: atomic writing and verified reading of the two files.
- ``int4``: packing of 4-bit codes.
"""

from __future__ import annotations

from qdiff_ao.deploy.checkpoint.archive import FORMAT_VERSION, load_graph, save_graph
from qdiff_ao.deploy.checkpoint.tensor_layout import CheckpointError

__all__ = ["CheckpointError", "FORMAT_VERSION", "load_graph", "save_graph"]
