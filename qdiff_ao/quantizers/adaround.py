"""The learnable quantizers of block reconstruction: AdaRound weights and LSQ-style activation step sizes.

AdaRound (Nagel et al. 2020; used by BRECQ and Q-Diffusion Sec. 4.3) learns, for every weight, whether to round
down or up. With step ``s``, zero point ``z`` and a continuous variable ``V`` per weight:

    h(V)   = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1  (rectified sigmoid)
    W_soft = (clamp(floor(W / s) + h(V) + z, quant_min, quant_max) - z) * s                 (training)
    W_hard = (clamp(floor(W / s) + [V >= 0] + z, quant_min, quant_max) - z) * s             (h(V) >= 1/2 <=> V >= 0)
    reg(V) = sum_i 1 - |2 h(V_i) - 1|^beta          (pushes every h to 0 or 1; beta is annealed high -> low)

``V`` starts where ``h(V)`` equals the fractional part of ``W / s``, i.e. ``W_soft == W`` inside the range.

Activations use a fake-quant whose step size is learned (LSQ, Esser et al. 2020), with the straight-through
estimator for the rounding and a log parameterisation so that one learning rate suits every layer:

    s = s0 * exp(u),   x_hat = (clamp(round_ste(x / s) + z, quant_min, quant_max) - z) * s

``s0`` and ``z`` come from the calibrated observer; ``z`` stays fixed.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.26, -0.74, 0.5]])
    >>> q = AdaRoundWeight(torch.tensor([0.5]), torch.tensor([0]), -8, 7, ch_axis=0)
    >>> q.init_rounding(w)
    >>> torch.allclose(q.soft_weight(), w, atol=1e-6), q.hard_codes().tolist()
    (True, [[1, -1, 1]])
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qdiff_ao.quantizers.rounding_autograd import (
    GAMMA,
    ZETA,
    abs_pow,
    rectified_sigmoid,
    rounding_regularizer,
    soft_weight,
)

__all__ = [
    "AdaRoundWeight",
    "LearnedStepQuant",
    "GAMMA",
    "ZETA",
    "beta_schedule",
    "lp_loss",
    "rectified_sigmoid",
]

_MODES = ("nearest", "soft", "hard")


def lp_loss(pred: torch.Tensor, target: torch.Tensor, p: float) -> torch.Tensor:
    """BRECQ's output error: ``mean over the other dims of sum over dim 1 of |pred - target|^p``.

    For a conv output [B, C, H, W] this sums over channels and averages over batch and pixels; 0-d and 1-d
    tensors are averaged.
    """
    err = abs_pow(pred - target, p)
    return err.sum(1).mean() if err.dim() >= 2 else err.mean()


def beta_schedule(step: int, iters: int, warmup: float, beta_start: float, beta_end: float) -> float | None:
    """Temperature of the rounding regulariser at ``step`` (0-based), or None during warm-up.

    No regulariser for the first ``warmup * iters`` steps; then ``beta`` falls linearly from ``beta_start`` to
    ``beta_end`` at the last step: ``beta = beta_end + (beta_start - beta_end) * (1 - (step - w) / (iters - 1 - w))``
    with ``w = int(warmup * iters)``.
    """
    start = int(warmup * iters)
    if step < start:
        return None
    progress = (step - start) / max(iters - 1 - start, 1)
    return beta_end + (beta_start - beta_end) * max(0.0, 1.0 - progress)


def _broadcast_shape(weight_dim: int, ch_axis: int | None, per_channel: bool) -> list[int]:
    shape = [1] * weight_dim
    if per_channel:
        shape[(ch_axis or 0) % weight_dim] = -1
    return shape


class AdaRoundWeight(nn.Module):
    """AdaRound quantizer of one weight tensor (per channel or per tensor qparams).

    Args:
        scale, zero_point: the weight observer's qparams (0-d, or 1-d along ``ch_axis``).
        quant_min, quant_max: the integer code range (e.g. -8, 7 for 4-bit weights).
        ch_axis: channel axis of per-channel qparams (0 for Conv2d / Linear).

    ``mode`` selects the forward: "nearest" (round to nearest, the baseline), "soft" (``W_soft``, training),
    "hard" (``W_hard``, the learned choice).
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    w_floor: torch.Tensor

    def __init__(
        self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, ch_axis: int = 0
    ) -> None:
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone()
        zero_point = torch.as_tensor(zero_point).detach().clone().to(torch.int64)
        if scale.shape != zero_point.shape or scale.dim() > 1:
            raise ValueError(
                f"AdaRoundWeight needs 0-d or 1-d scale and zero_point of equal shape, got {tuple(scale.shape)} "
                f"and {tuple(zero_point.shape)}"
            )
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("w_floor", torch.zeros(0))
        self.quant_min, self.quant_max, self.ch_axis = int(quant_min), int(quant_max), int(ch_axis)
        self.v = nn.Parameter(torch.zeros(0))
        self.mode = "nearest"

    def _qparams(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = _broadcast_shape(dim, self.ch_axis, self.scale.dim() == 1)
        return self.scale.reshape(shape), self.zero_point.reshape(shape).float()

    @property
    def initialized(self) -> bool:
        return self.v.numel() > 0

    def init_rounding(self, weight: torch.Tensor) -> None:
        """Store floor(W / s) and set V so that h(V) = W / s - floor(W / s)."""
        s, _ = self._qparams(weight.dim())
        x = weight.detach().float() / s
        floor = torch.floor(x)
        frac = (x - floor).clamp(0.0, 1.0)
        # sigmoid(V) = (frac - gamma) / (zeta - gamma)  <=>  V = -log((zeta - gamma) / (frac - gamma) - 1)
        v = -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)
        self.w_floor = floor
        self.v = nn.Parameter(v)

    def use_nearest(self, weight: torch.Tensor) -> None:
        """Set V so that the hard rounding is round-to-nearest (a fallback when AdaRound does not help)."""
        s, _ = self._qparams(weight.dim())
        x = weight.detach().float() / s
        up = torch.round(x) - torch.floor(x)
        self.w_floor = torch.floor(x)
        self.v = nn.Parameter(torch.where(up > 0, 10.0, -10.0))

    def set_codes(self, codes: torch.Tensor) -> None:
        """Make the hard rounding give exactly ``codes`` (restoring a saved result)."""
        _, z = self._qparams(codes.dim())
        self.w_floor = codes.to(self.scale.device).float() - z
        self.v = nn.Parameter(torch.full_like(self.w_floor, -10.0))

    def set_mode(self, mode: str) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        if mode != "nearest" and not self.initialized:
            raise RuntimeError("call init_rounding(weight) before using soft or hard rounding")
        self.mode = mode

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The quantized-dequantized weight of the current mode."""
        s, z = self._qparams(weight.dim())
        if self.mode == "nearest":
            codes = torch.clamp(torch.round(weight / s) + z, self.quant_min, self.quant_max)
        elif self.mode == "soft":  # one autograd node instead of ~15 (rounding_autograd: same values)
            return soft_weight(self.v, self.w_floor, s, z, self.quant_min, self.quant_max)
        else:
            codes = torch.clamp(self.w_floor + (self.v >= 0).float() + z, self.quant_min, self.quant_max)
        return (codes - z) * s

    def soft_weight(self) -> torch.Tensor:
        """W_soft (for tests and diagnostics)."""
        s, z = self._qparams(self.w_floor.dim())
        return soft_weight(self.v, self.w_floor, s, z, self.quant_min, self.quant_max)

    def hard_codes(self) -> torch.Tensor:
        """The learned integer codes clamp(floor(W / s) + [h >= 1/2] + z, quant_min, quant_max) (int64)."""
        if not self.initialized:
            raise RuntimeError("hard_codes() needs init_rounding(weight) first")
        _, z = self._qparams(self.w_floor.dim())
        up = (self.v.detach() >= 0).float()
        return torch.clamp(self.w_floor + up + z, self.quant_min, self.quant_max).to(torch.int64)

    def nearest_codes(self, weight: torch.Tensor) -> torch.Tensor:
        """clamp(round(W / s) + z, quant_min, quant_max) (int64): what convert would pick without AdaRound."""
        s, z = self._qparams(weight.dim())
        return torch.clamp(torch.round(weight.detach() / s) + z, self.quant_min, self.quant_max).to(torch.int64)

    def dequantize_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """(codes - z) * s: exact grid values."""
        s, z = self._qparams(codes.dim())
        return (codes.float() - z) * s

    def regularizer(self, beta: float) -> torch.Tensor:
        """sum_i 1 - |2 h(V_i) - 1|^beta (``rounding_autograd.rounding_regularizer``)."""
        return rounding_regularizer(self.v, beta)

    def extra_repr(self) -> str:
        return f"mode={self.mode}, range=[{self.quant_min}, {self.quant_max}], per_channel={self.scale.dim() == 1}"


class LearnedStepQuant(nn.Module):
    """Per-tensor activation fake-quant with a learnable step size s = s0 * exp(u) and a fixed zero point.

    Args:
        scale, zero_point: initial qparams (0-d or one-element tensors), from the calibrated observer.
        quant_min, quant_max: the integer code range.
        learnable: whether ``u`` may be optimised (a frozen quantizer keeps s = s0).

    Example:
        >>> import torch
        >>> fq = LearnedStepQuant(torch.tensor(0.1), torch.tensor(0), 0, 255)
        >>> fq(torch.tensor([0.04, 0.26, -1.0])).tolist()
        [0.0, 0.30000001192092896, 0.0]
    """

    init_scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(
        self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int, learnable: bool = True
    ) -> None:
        super().__init__()
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone().reshape(())
        if not math.isfinite(float(scale)) or float(scale) <= 0:
            raise ValueError(f"LearnedStepQuant needs a finite scale > 0, got {float(scale)}")
        self.register_buffer("init_scale", scale)
        self.register_buffer("zero_point", torch.as_tensor(zero_point).detach().clone().reshape(()).to(torch.int64))
        self.quant_min, self.quant_max = int(quant_min), int(quant_max)
        self.log_ratio = nn.Parameter(torch.zeros(()), requires_grad=learnable)
        self.learnable = learnable

    def reset(self) -> None:
        """Back to the calibrated step size (u = 0)."""
        with torch.no_grad():
            self.log_ratio.zero_()

    @property
    def scale(self) -> torch.Tensor:
        """The current step size s0 * exp(u)."""
        return self.init_scale * torch.exp(self.log_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale
        z = self.zero_point.float()
        q = x / s
        if not (torch.is_grad_enabled() and (x.requires_grad or s.requires_grad)):
            # No gradient wanted: the same values in place, one buffer instead of seven (a sampler run of the
            # simulation spends most of its quantizer time allocating; measured ~8x faster on a 4M-element tensor).
            return q.round_().add_(z).clamp_(self.quant_min, self.quant_max).sub_(z).mul_(s)
        q = torch.round(q).detach() + (q - q.detach())  # straight-through rounding (exact value): LSQ's gradient
        return (torch.clamp(q + z, self.quant_min, self.quant_max) - z) * s

    def extra_repr(self) -> str:
        return (
            f"scale={float(self.scale):.4g}, zero_point={int(self.zero_point)}, range=[{self.quant_min}, "
            f"{self.quant_max}], learnable={self.learnable}"
        )
