"""Quality yardsticks for quantized diffusion models: a digits FD and the per-step noise-prediction error.

**Digits FD** is an FID analogue for the bundled 16x16 digits model. FID (Heusel et al. 2017) compares
Inception-v3 pool features of generated and real images; Inception weights cannot be shipped or downloaded
here, and they would be meaningless on 16x16 grey digits anyway. Instead, a small CNN trained on the digits
(:class:`DigitClassifier`, weights bundled) gives 64-d features (its penultimate layer, before the ReLU), and
the Frechet distance between Gaussians fitted to the features of two image sets is

    d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})

Values are only comparable with other values of this metric, at the same sample count (the estimate is
biased upward for small sets: ``examples/train_classifier.py`` reports the measured floor and ceilings).
The reference statistics are those of the 300 held-out real digits.

**Noise-prediction error** compares a quantized UNet with its float original where it matters, on the inputs
the float sampler actually visits: for each DDIM step ``k`` with input ``x_t`` on the FP trajectory,

    e_k = ||eps_q(x_t, t) - eps_fp(x_t, t)||_F / ||eps_fp(x_t, t)||_F   (norms over the whole batch)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from safetensors.torch import load_file, save_file
from torch import nn

from qdiff_ao.app.bundled import CLASSIFIER_FILE, IMAGE_SIZE, NUM_CLASSES

__all__ = [
    "DigitClassifier",
    "DigitsFD",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "noise_prediction_error",
    "noise_prediction_offset",
]

logger = logging.getLogger(__name__)

_FORMAT_VERSION = "1"


class DigitClassifier(nn.Module):
    """Small CNN for 16x16 digits in ``[-1, 1]``; its penultimate layer gives the FD features.

    conv3x3(1->32) ReLU conv3x3(32->32) ReLU maxpool2 conv3x3(32->64) ReLU maxpool2 -> 64x4x4
    -> linear(1024->64) = features -> ReLU dropout linear(64->10) = logits.
    """

    feature_dim = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (IMAGE_SIZE // 4) ** 2, self.feature_dim),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.3), nn.Linear(self.feature_dim, NUM_CLASSES))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate pre-activation features ``(N, 64)`` (more Gaussian than post-ReLU ones)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 10)``."""
        return self.head(self.body(x))


def _as_features(feats: Any, name: str) -> torch.Tensor:
    if not isinstance(feats, torch.Tensor):
        try:
            feats = torch.as_tensor(feats)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name} must be a 2-D tensor or array (N, D), got {type(feats).__name__}") from err
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(
            f"{name} must have shape (N, D) with N >= 2 samples, got {tuple(feats.shape)}; "
            "pass at least two feature rows"
        )
    return feats.detach().to("cpu", torch.float64)


def feature_statistics(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of feature rows, in float64.

    ``mu = mean_i f_i``, ``S = sum_i (f_i - mu)(f_i - mu)^T / (N - 1)``.

    Args:
        feats: ``(N, D)`` features, ``N >= 2``.

    Returns:
        ``(mu, sigma)`` with shapes ``(D,)`` and ``(D, D)``.

    Raises:
        ValueError: if ``feats`` is not 2-D with at least two rows.
    """
    f = _as_features(feats, "feats")
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (f.shape[0] - 1)


def _sqrtm_psd(sigma: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix via eigh; tiny negative eigenvalues (round-off) become 0."""
    evals, evecs = torch.linalg.eigh((sigma + sigma.T) / 2)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def frechet_distance_from_statistics(
    mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor
) -> float:
    """Frechet distance between ``N(mu_a, S_a)`` and ``N(mu_b, S_b)``.

    ``d^2 = |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2})``. ``S_a S_b`` is not symmetric, so its
    square root is not taken directly: with ``A = S_a^{1/2}`` (symmetric, by eigendecomposition), ``A S_b A``
    is symmetric PSD and similar to ``S_a S_b`` (``A S_b A = A (S_a S_b) A^{-1}`` when ``S_a`` is invertible,
    and by continuity otherwise), so ``Tr((S_a S_b)^{1/2}) = sum_i sqrt(lambda_i(A S_b A))``. Two symmetric
    eigendecompositions in float64 replace ``scipy.linalg.sqrtm`` and never produce complex values.

    Args:
        mu_a: mean ``(D,)``; sigma_a: covariance ``(D, D)``; likewise ``mu_b``, ``sigma_b``.

    Returns:
        ``d^2`` as a Python float (clamped at 0 against round-off).

    Raises:
        ValueError: if the shapes do not agree.
    """
    mu_a, mu_b = mu_a.to(torch.float64), mu_b.to(torch.float64)
    sigma_a, sigma_b = sigma_a.to(torch.float64), sigma_b.to(torch.float64)
    d = mu_a.shape[-1]
    for name, t, shape in (("mu_a", mu_a, (d,)), ("mu_b", mu_b, (d,)), ("sigma_a", sigma_a, (d, d)),
                           ("sigma_b", sigma_b, (d, d))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} to match mu_a, got {tuple(t.shape)}")
    root_a = _sqrtm_psd(sigma_a)
    middle = root_a @ sigma_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * tr_covmean
    return max(float(d2), 0.0)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (the FID formula).

    ``d^2 = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` with the statistics of
    :func:`feature_statistics`; see :func:`frechet_distance_from_statistics` for the stable square root.

    Args:
        feats_a: ``(N_a, D)`` features; feats_b: ``(N_b, D)`` features.

    Returns:
        ``d^2`` as a float.

    Raises:
        ValueError: if either set is not 2-D with at least two rows, or the widths ``D`` differ.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> a = torch.randn(500, 4, generator=g)
        >>> round(frechet_distance(a, a), 6)
        0.0
        >>> frechet_distance(a, a + 3.0) > 35.9  # a pure shift adds |3 * ones(4)|^2 = 36
        True
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: feats_a has D={a.shape[1]}, feats_b has D={b.shape[1]}")
    return frechet_distance_from_statistics(*feature_statistics(a), *feature_statistics(b))


class DigitsFD:
    """Digits FD and classifier confidence against the bundled held-out reference statistics.

    Args:
        classifier: a trained :class:`DigitClassifier` (put in eval mode here).
        ref_mu: reference feature mean ``(D,)``; ref_sigma: reference covariance ``(D, D)``.
        batch_size: images per classifier forward pass.

    Example:
        >>> from qdiff_ao.app.bundled import load_digits_tensor
        >>> metric = DigitsFD.from_bundled()
        >>> metric.fd(load_digits_tensor("heldout")) < 1e-6  # the reference set itself
        True
    """

    def __init__(self, classifier: DigitClassifier, ref_mu: torch.Tensor, ref_sigma: torch.Tensor,
                 batch_size: int = 500) -> None:
        if not isinstance(classifier, DigitClassifier):
            raise TypeError(f"classifier must be a DigitClassifier, got {type(classifier).__name__}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.classifier = classifier.eval()
        self.ref_mu = ref_mu.to(torch.float64)
        self.ref_sigma = ref_sigma.to(torch.float64)
        self.batch_size = batch_size

    @classmethod
    def from_bundled(cls, path: str | Path | None = None, batch_size: int = 500) -> DigitsFD:
        """Load the classifier and reference statistics from ``digits_classifier.safetensors``.

        Raises:
            FileNotFoundError: if the file is missing (build it with ``examples/train_classifier.py``).
        """
        file = Path(path) if path is not None else CLASSIFIER_FILE
        if not file.is_file():
            raise FileNotFoundError(
                f"classifier file {str(file)!r} not found; build it with examples/train_classifier.py"
            )
        tensors = load_file(str(file))
        model = DigitClassifier()
        prefix = "classifier."
        model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return cls(model, tensors["ref_mu"], tensors["ref_sigma"], batch_size=batch_size)

    def save(self, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
        """Write classifier weights and reference statistics to one safetensors file."""
        tensors = {f"classifier.{k}": v.contiguous() for k, v in self.classifier.state_dict().items()}
        tensors.update(ref_mu=self.ref_mu.contiguous(), ref_sigma=self.ref_sigma.contiguous())
        meta = {"format_version": _FORMAT_VERSION, **{k: json.dumps(v) for k, v in (metadata or {}).items()}}
        save_file(tensors, str(path), metadata=meta)

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"images must have shape (N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) with values in [-1, 1], "
                f"got {tuple(images.shape)}; use qdiff_ao.app.bundled.load_digits_tensor or the bundled DDPM's samples"
            )
        return images.detach().to("cpu", torch.float32)

    @torch.no_grad()
    def _apply(self, images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = self._check_images(images)
        return torch.cat([fn(chunk) for chunk in x.split(self.batch_size)])

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Classifier features ``(N, 64)`` of images ``(N, 1, 16, 16)`` in ``[-1, 1]``."""
        return self._apply(images, self.classifier.features)

    def fd(self, images: torch.Tensor) -> float:
        """Frechet distance of the images' features to the held-out reference statistics.

        ``d^2 = |mu - mu_ref|^2 + Tr(S + S_ref - 2 (S S_ref)^{1/2})``. Use the same image count when
        comparing values (the reference has 300 images; 300 samples is the bundled convention).
        """
        feats = self.features(images)
        if feats.shape[0] < 2:
            raise ValueError(f"fd needs at least 2 images, got {feats.shape[0]}")
        if feats.shape[0] <= feats.shape[1]:
            logger.warning("fd on %d images for %d-d features: the covariance is singular and the FD "
                           "strongly biased; use >= 300 images", feats.shape[0], feats.shape[1])
        return frechet_distance_from_statistics(*feature_statistics(feats), self.ref_mu, self.ref_sigma)

    def mean_confidence(self, images: torch.Tensor) -> float:
        """Mean top-class probability ``mean_i max_c softmax(logits_i)_c``.

        A secondary signal only: like most classifiers, this one is overconfident far from the data (uniform
        noise images still score about 0.96), so a drop is meaningful but a high value proves little; the FD
        is the primary metric.
        """
        probs = self._apply(images, self.classifier).softmax(-1)
        return float(probs.max(-1).values.mean())

    def accuracy(self, images: torch.Tensor, labels: torch.Tensor) -> float:
        """Fraction of images whose argmax class equals ``labels``."""
        pred = self._apply(images, self.classifier).argmax(-1)
        if labels.shape != pred.shape:
            raise ValueError(f"labels must have shape {tuple(pred.shape)}, got {tuple(labels.shape)}")
        return float((pred == labels.to(pred.device)).float().mean())


def _eps(model: Callable[..., Any], x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(sample=x, timestep=t.reshape(1).repeat(x.shape[0]))
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.sample if hasattr(out, "sample") else out


@torch.no_grad()
def noise_prediction_error(
    unet_fp: Callable[..., Any],
    unet_q: Callable[..., Any],
    scheduler: Any,
    *,
    num_samples: int = 64,
    num_inference_steps: int = 50,
    sample_shape: tuple[int, ...] = (1, IMAGE_SIZE, IMAGE_SIZE),
    seed: int = 0,
) -> torch.Tensor:
    """Relative error of the quantized noise prediction at every step of the FP DDIM trajectory.

    ``e_k = ||eps_q(x_k, t_k) - eps_fp(x_k, t_k)||_F / ||eps_fp(x_k, t_k)||_F`` where ``x_k`` follows the
    float model's deterministic DDIM (eta = 0) trajectory from seeded noise, so both models see exactly the
    same inputs and errors do not compound along the chain (that is what sample FD measures).

    Args:
        unet_fp: float model called as ``unet(sample=x, timestep=t_vec)``; may return a tensor, a tuple or an
            object with ``.sample`` (diffusers ``UNet2DModel``, a traced or converted ``GraphModule``).
        unet_q: quantized model with the same calling convention.
        scheduler: any diffusers scheduler; a ``DDIMScheduler`` is built from its config.
        num_samples: trajectories (batch size; a traced model may require the batch it was traced with).
        num_inference_steps: DDIM steps.
        sample_shape: ``(C, H, W)`` of ``x_t``.
        seed: seed of the initial noise.

    Returns:
        Float tensor ``(num_inference_steps,)``, ordered like ``scheduler.timesteps`` (noisiest first).

    Raises:
        ValueError: if ``num_samples`` or ``num_inference_steps`` is below 1.
    """
    errors = [((eps_q - eps_fp).norm() / eps_fp.norm().clamp(min=1e-12)).item()
              for eps_fp, eps_q in _fp_trajectory(unet_fp, unet_q, scheduler, num_samples, num_inference_steps,
                                                  sample_shape, seed)]
    return torch.tensor(errors)


@torch.no_grad()
def noise_prediction_offset(
    unet_fp: Callable[..., Any],
    unet_q: Callable[..., Any],
    scheduler: Any,
    *,
    num_samples: int = 64,
    num_inference_steps: int = 50,
    sample_shape: tuple[int, ...] = (1, IMAGE_SIZE, IMAGE_SIZE),
    seed: int = 0,
) -> torch.Tensor:
    """Mean (signed) error of the quantized noise prediction per channel at every step of the FP DDIM trajectory.

    ``o_k[c] = mean_{n,h,w} (eps_q(x_k, t_k) - eps_fp(x_k, t_k))[n, c, h, w]`` on the same inputs as
    :func:`noise_prediction_error`. A sampler adds such an offset up over all its steps (a brightness drift of
    the images), which :func:`qdiff_ao.passes.correct_output_bias` removes; this function measures it.

    Returns:
        Float tensor ``(num_inference_steps, C)``, steps ordered like ``scheduler.timesteps``.

    Raises:
        ValueError: if ``num_samples`` or ``num_inference_steps`` is below 1.
    """
    offsets = [(eps_q - eps_fp).double().mean(dim=(0, 2, 3)).float()
               for eps_fp, eps_q in _fp_trajectory(unet_fp, unet_q, scheduler, num_samples, num_inference_steps,
                                                   sample_shape, seed)]
    return torch.stack(offsets)


def _fp_trajectory(
    unet_fp: Callable[..., Any], unet_q: Callable[..., Any], scheduler: Any, num_samples: int,
    num_inference_steps: int, sample_shape: tuple[int, ...], seed: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(eps_fp, eps_q) at every step of the float model's deterministic DDIM (eta 0) run from seeded noise."""
    if num_samples < 1 or num_inference_steps < 1:
        raise ValueError(f"num_samples and num_inference_steps must be >= 1, got {num_samples} and "
                         f"{num_inference_steps}")
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(num_inference_steps)
    x = torch.randn((num_samples, *sample_shape), generator=torch.Generator().manual_seed(seed))
    for t in ddim.timesteps:
        eps_fp = _eps(unet_fp, x, t)
        yield eps_fp, _eps(unet_q, x, t)
        x = ddim.step(eps_fp, t, x).prev_sample
