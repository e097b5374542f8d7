"""Class labels as token embeddings: the text-encoder stand-in of the class-conditional zoo model.

A Stable-Diffusion UNet takes ``encoder_hidden_states`` ``(B, L, D)`` from a text encoder. The class-conditional
zoo model takes the same kind of input from a learned table: class ``c`` maps to ``L`` tokens of width ``D``,

    tokens(c) = E[c].view(L, D)        E: (num_classes + 1, L * D), row num_classes = the "null" class

The null class is the unconditional input of classifier-free guidance (Ho & Salimans 2022): during training a
random 10% of labels are replaced by it, and at sampling ``eps = eps(null) + s * (eps(c) - eps(null))``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["CLASS_TOKENS_FILE", "ClassTokens"]

CLASS_TOKENS_FILE = "class_tokens.safetensors"
"""File name of the class-token table inside a zoo model folder."""


class ClassTokens(nn.Module):
    """Learned ``(num_classes + 1) x num_tokens x dim`` table; the last class is the null (unconditional) one."""

    def __init__(self, num_classes: int, num_tokens: int, dim: int) -> None:
        super().__init__()
        if min(num_classes, num_tokens, dim) < 1:
            raise ValueError(f"num_classes, num_tokens and dim must be >= 1, got {num_classes}, {num_tokens}, {dim}")
        self.num_classes, self.num_tokens, self.dim = num_classes, num_tokens, dim
        self.table = nn.Embedding(num_classes + 1, num_tokens * dim)
        nn.init.normal_(self.table.weight, std=1.0)

    @property
    def null_class(self) -> int:
        """Label of the unconditional (null) class."""
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` int labels in ``[0, num_classes]`` -> ``(B, num_tokens, dim)`` embeddings."""
        if labels.dtype not in (torch.int32, torch.int64) or labels.dim() != 1:
            raise ValueError(f"labels must be a 1-d integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] (the last is the null class)")
        return self.table(labels).view(-1, self.num_tokens, self.dim)

    def save(self, folder: str | Path) -> Path:
        """Write the table to ``folder / CLASS_TOKENS_FILE``."""
        path = Path(folder) / CLASS_TOKENS_FILE
        meta = {"num_classes": str(self.num_classes), "num_tokens": str(self.num_tokens), "dim": str(self.dim)}
        save_file({"table": self.table.weight.detach().contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ClassTokens:
        """Read a table written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(folder) / CLASS_TOKENS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no class-token table {str(path)!r}; train the model with examples/train_zoo.py")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        module = cls(int(meta["num_classes"]), int(meta["num_tokens"]), int(meta["dim"]))
        module.table.weight.data.copy_(load_file(str(path))["table"])
        return module.eval()
