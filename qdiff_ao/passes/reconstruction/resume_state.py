"""Resumable reconstruction: the learned state of finished blocks, saved after each block (safetensors, no pickle).

The file holds, per finished block, the hard AdaRound codes of its layers and the log step-size ratios of its
activation quantizers, plus (in the metadata) the block's report entry and a fingerprint of the run
(reconstruction settings and block list). A restarted run restores finished blocks instead of optimising them,
so it ends with exactly the result an uninterrupted run gives.

    tensors   "codes/<layer>"  int16 codes,   "act/<quantizer>"  0-d float (u of s = s0 * exp(u))
    metadata  {"qdiff_ao_format": "reconstruction_state", "fingerprint": ..., "blocks": JSON {name: entry}}
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

if TYPE_CHECKING:
    from qdiff_ao.calibration.calibration_set import CalibrationSet
    from qdiff_ao.config import ReconstructionConfig

__all__ = ["ReconstructionState", "run_fingerprint"]

_FORMAT = "reconstruction_state"


class ReconstructionState:
    """Finished blocks of one reconstruction run, mirrored to ``path`` after every block.

    Args:
        path: the state file; loaded when it exists.
        fingerprint: identifies the run (settings, blocks); a file with another fingerprint is refused. ``None``
            reads any state file, to restore its blocks into another run (``reconstruct(restore=...)``).

    Raises:
        ValueError: if the file is not a reconstruction state or belongs to another run.
    """

    def __init__(self, path: str | os.PathLike[str], fingerprint: str | None) -> None:
        self.path = os.fspath(path)
        self.fingerprint = fingerprint
        self.tensors: dict[str, torch.Tensor] = {}
        self.blocks: dict[str, dict[str, Any]] = {}
        if os.path.exists(self.path):
            self._load()

    def _load(self) -> None:
        try:
            with safe_open(self.path, framework="pt", device="cpu") as f:
                meta = dict(f.metadata() or {})
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(
                f"reconstruction state {self.path!r} is not readable ({exc}); delete it to start over"
            ) from None
        if meta.get("qdiff_ao_format") != _FORMAT:
            raise ValueError(f"{self.path!r} is not a qdiff_ao reconstruction state file")
        if self.fingerprint is not None and meta.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"reconstruction state {self.path!r} comes from a run with other settings or another graph; "
                "use another state_path or delete the file to start over"
            )
        self.tensors = tensors
        self.blocks = json.loads(meta.get("blocks", "{}"))

    def done(self, block: str) -> bool:
        return block in self.blocks

    def add(self, block: str, entry: dict[str, Any], codes: dict[str, torch.Tensor],
            acts: dict[str, torch.Tensor]) -> None:
        """Record a finished block and rewrite the file (atomically: write a temporary file, then rename)."""
        if self.fingerprint is None:
            raise ValueError(f"{self.path!r} was read without a fingerprint (to restore from); it is read-only")
        self.blocks[block] = entry
        for name, value in codes.items():
            self.tensors[f"codes/{name}"] = value.detach().to(torch.int16).cpu().contiguous()
        for name, value in acts.items():
            self.tensors[f"act/{name}"] = value.detach().float().cpu().reshape(()).clone()
        meta = {"qdiff_ao_format": _FORMAT, "fingerprint": self.fingerprint, "blocks": json.dumps(self.blocks)}
        tmp = f"{self.path}.tmp"
        save_file(self.tensors, tmp, metadata=meta)
        os.replace(tmp, self.path)

    def forget(self, blocks: list[str]) -> None:
        """Drop ``blocks`` from the finished ones (in memory; the file is not rewritten)."""
        for block in blocks:
            self.blocks.pop(block, None)

    def codes(self, layer: str) -> torch.Tensor:
        return self.tensors[f"codes/{layer}"].to(torch.int64)

    def act(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(f"act/{name}")


def run_fingerprint(rcfg: ReconstructionConfig, blocks: list[list[Any]], calib: CalibrationSet, rows: int,
                    guidance: float | None) -> str:
    """Identifies a run for resuming: settings, rows, calibration data and the blocks ``[name, layers]``."""
    data: dict[str, Any] = {"config": asdict(rcfg), "rows": rows,
                            "calib": [len(calib), float(calib.sample.double().sum())], "blocks": blocks}
    if guidance is not None:  # (absent otherwise: state files of runs without guidance stay valid)
        data["guidance"] = guidance
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
