"""Bundled artifacts: the digits data set, a small trained DDPM and a digit classifier for the FD metric.

Everything here is produced by ``examples/train_ddpm.py`` and ``examples/train_classifier.py`` and loaded
from the package folder, so no weights or data are downloaded at run time.
"""

from __future__ import annotations

from pathlib import Path

from qdiff_ao.app.bundled.data import DIGITS_FILE, IMAGE_SIZE, NUM_CLASSES, export_digits, load_digits_tensor

__all__ = [
    "BUNDLED_DIR",
    "CLASSIFIER_FILE",
    "DIGITS_DDPM_DIR",
    "DIGITS_FILE",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "export_digits",
    "load_digits_tensor",
]

BUNDLED_DIR = Path(__file__).resolve().parent
"""Folder holding the bundled artifacts."""

DIGITS_DDPM_DIR = BUNDLED_DIR / "digits-ddpm"
"""Trained DDPM: ``UNet2DModel.from_pretrained(DIGITS_DDPM_DIR, subfolder="unet")`` and ``.../scheduler``."""

CLASSIFIER_FILE = BUNDLED_DIR / "digits_classifier.safetensors"
"""Digit classifier weights plus the held-out reference feature statistics for the FD metric."""
