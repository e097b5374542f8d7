"""The bundled handwritten-digits data set (scikit-learn's 8x8 digits, shipped as safetensors).

The 1,797 digit images of :func:`sklearn.datasets.load_digits` (UCI "Optical Recognition of Handwritten
Digits", openly licensed) are stored in ``digits.safetensors`` next to this file, so that nothing at run time
imports scikit-learn and nothing is downloaded:

- ``images``: uint8 ``(1797, 8, 8)``, grey levels ``0..16``;
- ``labels``: uint8 ``(1797,)``, the digit ``0..9``;
- ``heldout``: uint8 ``(1797,)``, ``1`` for the 300 held-out images (30 per class, chosen once with a seeded
  permutation when the file was written), ``0`` for the 1,497 training images.

The split is stored in the file rather than recomputed, so it cannot drift with the random number generator
of a future torch release.

:func:`load_digits_tensor` turns the grey levels into model inputs::

    x8 = 2 * v / 16 - 1                       # [0, 16] -> [-1, 1]
    x16 = bilinear_upsample(x8, 16x16)        # align_corners=False, no antialias

Bilinear (rather than nearest) upsampling is used because nearest would make every image piecewise constant
on 2x2 blocks, a rigid structure the DDPM would have to learn exactly and whose violations (seams between
blocks) would dominate any comparison of samples. Bilinear images are smooth like natural images, and since
each output pixel is a convex combination of input pixels, the values stay inside ``[-1, 1]``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

__all__ = [
    "DIGITS_FILE",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "export_digits",
    "load_digits_tensor",
]

logger = logging.getLogger(__name__)

DIGITS_FILE = Path(__file__).resolve().parent / "digits.safetensors"
"""Path of the bundled digits file."""

IMAGE_SIZE = 16
"""Side of the upsampled images fed to the bundled DDPM and classifier."""

NUM_CLASSES = 10
"""Number of digit classes."""

_SPLITS = ("train", "heldout", "all")
_HELDOUT_PER_CLASS = 30
_SPLIT_SEED = 0


def load_digits_tensor(
    split: str = "train",
    *,
    size: int = IMAGE_SIZE,
    with_labels: bool = False,
    path: str | Path | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Load the bundled digits as float images in ``[-1, 1]``.

    ``x = upsample_bilinear(2 * v / 16 - 1, size)`` for grey levels ``v`` in ``0..16``.

    Args:
        split: ``"train"`` (1,497 images), ``"heldout"`` (300 images, 30 per class) or ``"all"`` (1,797).
        size: output side; 8 returns the original resolution, larger values upsample bilinearly.
        with_labels: also return the int64 labels.
        path: another digits file in the same format (defaults to :data:`DIGITS_FILE`).

    Returns:
        Float32 tensor ``(N, 1, size, size)``, or ``(images, labels)`` if ``with_labels``.

    Raises:
        ValueError: if ``split`` or ``size`` is not valid.
        FileNotFoundError: if the digits file is missing.

    Example:
        >>> x, y = load_digits_tensor("heldout", with_labels=True)
        >>> tuple(x.shape), tuple(y.shape)
        ((300, 1, 16, 16), (300,))
        >>> bool(x.min() >= -1) and bool(x.max() <= 1)
        True
    """
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size must be an int >= 8 (the digits are 8x8), got {size!r}")
    file = Path(path) if path is not None else DIGITS_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"digits file {str(file)!r} not found; rebuild it with "
            "qdiff_ao.app.bundled.data.export_digits() (needs scikit-learn)"
        )
    tensors = load_file(str(file))
    images, labels, heldout = tensors["images"], tensors["labels"], tensors["heldout"].bool()
    if split == "train":
        keep = ~heldout
    elif split == "heldout":
        keep = heldout
    else:
        keep = torch.ones_like(heldout)
    x = images[keep].to(torch.float32).unsqueeze(1) * (2.0 / 16.0) - 1.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp_(-1.0, 1.0)  # guards float round-off only; bilinear weights are convex
    if with_labels:
        return x, labels[keep].to(torch.int64)
    return x


def export_digits(path: str | Path | None = None) -> Path:
    """Write scikit-learn's digits and the fixed split to a safetensors file (build time only).

    The held-out set takes the first 30 images of each class in a permutation drawn with
    ``torch.Generator().manual_seed(0)``; the other 1,497 images are the training set.

    Args:
        path: output file (defaults to :data:`DIGITS_FILE`).

    Returns:
        The path written.

    Raises:
        ImportError: if scikit-learn is not installed (it is needed only here, never at run time).
    """
    try:
        from sklearn.datasets import load_digits  # build-time only dependency
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("export_digits needs scikit-learn: pip install scikit-learn") from err
    bunch = load_digits()
    images = torch.as_tensor(bunch.images).round().to(torch.uint8)
    labels = torch.as_tensor(bunch.target).to(torch.uint8)
    gen = torch.Generator().manual_seed(_SPLIT_SEED)
    order = torch.randperm(len(labels), generator=gen)
    heldout = torch.zeros(len(labels), dtype=torch.uint8)
    for c in range(NUM_CLASSES):
        members = order[labels[order] == c]
        heldout[members[:_HELDOUT_PER_CLASS]] = 1
    out = Path(path) if path is not None else DIGITS_FILE
    save_file(
        {"images": images.contiguous(), "labels": labels, "heldout": heldout},
        str(out),
        metadata={"source": "sklearn.datasets.load_digits", "levels": "0..16"},
    )
    logger.info("wrote %d digits (%d held out) to %s", len(labels), int(heldout.sum()), out)
    return out
