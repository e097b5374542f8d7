"""What a UNet's output says about the clean image: the denoised estimate ``x0`` of a noise, v or sample prediction.

With ``a = alpha_bar_t`` (the training schedule's cumulative product of ``1 - beta``) and ``x`` the UNet's input
``x_t = sqrt(a) x0 + sqrt(1 - a) eps``, diffusers' schedulers read the output ``y`` as

* ``"epsilon"``: ``x0 = (x - sqrt(1 - a) y) / sqrt(a)``, so ``d x0 / d y = -sqrt(1 - a) / sqrt(a)``;
* ``"v_prediction"``: ``x0 = sqrt(a) x - sqrt(1 - a) y``, so ``d x0 / d y = -sqrt(1 - a)``;
* ``"sample"``: ``x0 = y``, so ``d x0 / d y = 1``.

:func:`rescale_x0_spread` changes the prediction so that its ``x0`` becomes ``m + s (x0 - m)`` (a spread ``s``
around a centre ``m``), in the form ``y' = y + (s - 1) (x0 - m) / (d x0 / d y)``: exactly ``y`` where ``s = 1``,
and affine in ``y``, so with classifier-free guidance applying it to both rows of a pair applies it to the guided
output ``u + w (c - u)`` (the weights ``1 - w`` and ``w`` add up to 1).
"""

from __future__ import annotations

import torch

__all__ = ["PREDICTION_TYPES", "alpha_bar_at", "predicted_x0", "rescale_x0_spread"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _check(kind: str) -> None:
    if kind not in PREDICTION_TYPES:
        raise ValueError(f"prediction type must be one of {PREDICTION_TYPES}, got {kind!r}")


def alpha_bar_at(alphas_cumprod: torch.Tensor, timestep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``alpha_bar`` at each timestep (rounded to the nearest training step, clamped to the table), shaped
    ``(B, 1, ..., 1)`` to broadcast against ``like``."""
    index = timestep.reshape(-1).round().long().clamp(0, alphas_cumprod.shape[0] - 1)
    return alphas_cumprod[index].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _slope(a: torch.Tensor, kind: str) -> torch.Tensor:
    """``d x0 / d y`` of the prediction type."""
    if kind == "epsilon":
        return -(1 - a).sqrt() / a.sqrt()
    if kind == "v_prediction":
        return -(1 - a).sqrt()
    return torch.ones_like(a)


def predicted_x0(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, kind: str) -> torch.Tensor:
    """The denoised estimate ``x0`` of prediction ``y`` at input ``x`` and ``alpha_bar`` ``a`` (module docstring)."""
    _check(kind)
    if kind == "epsilon":
        return (x - (1 - a).sqrt() * y) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * x - (1 - a).sqrt() * y
    return y


def rescale_x0_spread(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, spread: torch.Tensor, centre: torch.Tensor,
                      kind: str) -> torch.Tensor:
    """``y'`` whose ``x0`` is ``centre + spread * (x0 - centre)``; ``spread`` and ``centre`` broadcast against
    ``y`` (e.g. ``(B, C, 1, 1)`` per channel)."""
    x0 = predicted_x0(y, x, a, kind)
    return y + (spread - 1) * (x0 - centre) / _slope(a, kind)
