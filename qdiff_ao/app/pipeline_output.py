"""The quantized pipeline folder: loads with ``DiffusionPipeline.from_pretrained(folder)`` and no other code.

    pipeline/model_index.json   the source pipeline's, with "unet": ["qdiff_ao", "QuantizedUNet"]
    pipeline/unet/              the compressed quantized checkpoint (QuantizedUNet.save_pretrained)
    pipeline/<component>/       every other component, copied byte for byte from the source folder
    pipeline/README.md          the model card (qdiff_ao.app.model_card)

diffusers resolves ``["qdiff_ao", "QuantizedUNet"]`` by importing ``qdiff_ao`` and calling
``QuantizedUNet.from_pretrained(pipeline/unet, ...)``; a bare ``unet/`` + ``scheduler/`` source becomes a
``DDIMPipeline`` (DDIM scheduler) or ``DDPMPipeline`` (any other scheduler) folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import diffusers

from qdiff_ao.app.model_source import ModelSource

__all__ = ["QUANTIZED_UNET_ENTRY", "write_pipeline_folder"]

QUANTIZED_UNET_ENTRY = ["qdiff_ao", "QuantizedUNet"]


def _model_index(source: ModelSource) -> dict[str, Any]:
    if source.model_index is not None:
        index = dict(source.model_index)
    else:
        index = {"_class_name": source.pipeline_class, "_diffusers_version": diffusers.__version__,
                 **source.components()}
    index["unet"] = list(QUANTIZED_UNET_ENTRY)
    return index


def write_pipeline_folder(source: ModelSource, folder: Path, card: str) -> Path:
    """Complete the pipeline folder described in the module docstring around ``folder/unet`` (the quantized
    checkpoint, written by ``QuantizedUNet.save_pretrained``): the other components, ``model_index.json`` and the
    model card ``card``.

    Raises:
        FileNotFoundError: ``folder/unet`` holds no checkpoint.
    """
    if not (folder / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'unet'} holds no quantized checkpoint; save the QuantizedUNet there first")
    for name in source.components():
        shutil.copytree(source.root / name, folder / name, symlinks=False)
    (folder / "model_index.json").write_text(json.dumps(_model_index(source), indent=2, sort_keys=True) + "\n",
                                             encoding="utf-8")
    (folder / "README.md").write_text(card, encoding="utf-8")
    return folder
