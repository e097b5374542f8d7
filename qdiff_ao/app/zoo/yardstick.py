"""The FD yardstick of a zoo model: a shape classifier's features of samples vs procedural reference images.

As for the digits (:mod:`qdiff_ao.app.metrics`), Inception features cannot be shipped; a small CNN trained to
tell the shape classes apart (:class:`ShapesClassifier`) gives 64-d penultimate features, and the FD is the
Frechet distance between Gaussians fitted to the features of the samples and of :data:`REFERENCE_SIZE`
reference images ``make_shapes(REFERENCE_SIZE, size, seed=REFERENCE_SEED)`` (seeds no training batch uses):

    d^2 = |mu_s - mu_r|^2 + Tr(S_s + S_r - 2 (S_s S_r)^{1/2})

The classifier weights and reference statistics live in ``<zoo folder>/classifier.safetensors``
(``examples/train_zoo_classifier.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from qdiff_ao.app.metrics import feature_statistics, frechet_distance_from_statistics
from qdiff_ao.app.zoo.registry import zoo_entry
from qdiff_ao.app.zoo.shapes import SHAPE_CLASSES

__all__ = ["CLASSIFIER_FILE", "REFERENCE_SEED", "REFERENCE_SIZE", "ShapesClassifier", "ShapesFD"]

CLASSIFIER_FILE = "classifier.safetensors"
REFERENCE_SIZE = 2000
REFERENCE_SEED = 7


class ShapesClassifier(nn.Module):
    """conv3x3(3->32) ReLU conv3x3(32->32) ReLU pool2 conv3x3(32->64) ReLU pool2 conv3x3(64->64) ReLU
    global-avg-pool -> linear(64->64) = features -> ReLU linear(64->classes)."""

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(64, self.feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(self.feature_dim, len(SHAPE_CLASSES)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class ShapesFD:
    """FD of images ``(N, 3, S, S)`` in ``[-1, 1]`` against a zoo model's reference statistics."""

    def __init__(self, classifier: ShapesClassifier, ref_mu: torch.Tensor, ref_sigma: torch.Tensor,
                 image_size: int, batch_size: int = 500) -> None:
        self.classifier = classifier.eval()
        self.ref_mu, self.ref_sigma = ref_mu.double(), ref_sigma.double()
        self.image_size, self.batch_size = image_size, batch_size

    @classmethod
    def for_zoo(cls, name: str) -> ShapesFD:
        """Load the yardstick of zoo model ``name``.

        Raises:
            FileNotFoundError: no classifier yet (the message says how to train it).
        """
        entry = zoo_entry(name)
        path = entry.folder / CLASSIFIER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no FD classifier {str(path)!r}; run python examples/train_zoo_classifier.py "
                                    f"{name}")
        tensors = load_file(str(path))
        model = ShapesClassifier()
        model.load_state_dict({k.removeprefix("classifier."): v for k, v in tensors.items()
                               if k.startswith("classifier.")})
        return cls(model, tensors["ref_mu"], tensors["ref_sigma"], entry.image_size)

    def save(self, path: str | Path) -> None:
        tensors = {f"classifier.{k}": v.contiguous() for k, v in self.classifier.state_dict().items()}
        tensors.update(ref_mu=self.ref_mu.contiguous(), ref_sigma=self.ref_sigma.contiguous())
        save_file(tensors, str(path), metadata={"reference_size": str(REFERENCE_SIZE),
                                                "reference_seed": str(REFERENCE_SEED)})

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        expected = (3, self.image_size, self.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (N, {', '.join(map(str, expected))}) in [-1, 1], got "
                             f"{tuple(images.shape)}")
        return torch.cat([self.classifier.features(c) for c in images.float().split(self.batch_size)])

    def fd(self, images: torch.Tensor) -> float:
        """Frechet distance of the images' features to the reference statistics."""
        return frechet_distance_from_statistics(*feature_statistics(self.features(images)), self.ref_mu,
                                                self.ref_sigma)

    @torch.no_grad()
    def predicted_classes(self, images: torch.Tensor) -> torch.Tensor:
        """The classifier's class index (into ``SHAPE_CLASSES``) of each image, int64 ``(N,)``."""
        return torch.cat([self.classifier(c) for c in images.float().split(self.batch_size)]).argmax(-1)

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        return float((self.predicted_classes(images) == labels).float().mean())
