"""Hand-written gradients for the elementwise chains of AdaRound training: the same functions, fewer passes.

Block reconstruction spends most of an AdaRound iteration on elementwise work over the block's *weights*, not on
its convolutions: at 8x8 or 4x4 resolution a 256-channel 3x3 conv on 4 rows costs ~2-5 ms forward and backward,
while autograd's chain for ``W_soft`` and the rounding regulariser of its 590k weights cost ~12-15 ms (some 30
tensor passes, each with a fresh buffer, and two ``pow`` calls with a float exponent, which torch evaluates ~7x
slower than ``exp``). Here each chain is one ``torch.autograd.Function`` that computes its local derivative in
the forward pass (in place where it can), so the backward pass is a single multiply.

Functions (``h(V)`` is AdaRound's rectified sigmoid, ``zeta = 1.1``, ``gamma = -0.1``):

    soft_weight(V)          W = (clamp(floor(W / s) + h(V) + z, qmin, qmax) - z) * s
                            dW/dV = s * (zeta - gamma) * sigmoid(V) * (1 - sigmoid(V)) * [inside both clamps]
    rounding_regularizer(V) R = sum_i 1 - |2 h(V_i) - 1|^beta
                            dR/dV = -2 beta |2h - 1|^(beta - 1) sgn(2h - 1) * dh/dV
    abs_pow(x, p)           |x|^p = exp(p log|x|),   d/dx = p exp((p - 1) log|x|) sgn(x)    (p > 1)

Values: ``soft_weight`` gives bit for bit the values of the autograd expression (the same operations in the same
order); its gradient and the two ``exp(p log |x|)`` forms agree with autograd's to float rounding (~1e-7
relative, tested), not bit for bit. Clamp derivatives follow torch's: 1 strictly inside the bounds, 0 on them.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["GAMMA", "ZETA", "abs_pow", "rectified_sigmoid", "rounding_regularizer", "soft_weight"]

GAMMA, ZETA = -0.1, 1.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), through autograd."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _rectified(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h(V), dh/dV)``: h = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1), its derivative 0 outside [0, 1]."""
    sig = torch.sigmoid(v)
    h = sig * (ZETA - GAMMA)
    h.add_(GAMMA)
    # (zeta - gamma) sig (1 - sig) strictly inside (0, 1): torch's clamp passes no gradient at its bounds either
    dh = torch.sub(1.0, sig).mul_(sig).mul_(ZETA - GAMMA)
    dh.masked_fill_((h <= 0) | (h >= 1), 0.0)
    return h.clamp_(0.0, 1.0), dh


class _SoftWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, w_floor: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                quant_min: int, quant_max: int) -> torch.Tensor:
        h, dh = _rectified(v)
        codes = w_floor + h
        codes.add_(zero)
        dh.masked_fill_((codes <= quant_min) | (codes >= quant_max), 0.0)
        ctx.save_for_backward(dh.mul_(scale))
        return codes.clamp_(quant_min, quant_max).sub_(zero).mul_(scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (local,) = ctx.saved_tensors
        return grad * local, None, None, None, None, None


class _RoundingRegularizer(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, v: torch.Tensor, beta: float) -> torch.Tensor:
        h, dh = _rectified(v)
        t = h.mul_(2.0).sub_(1.0)
        log_abs = t.abs().log_()
        # -2 beta |t|^(beta - 1) sgn(t) dh/dV; at t = 0 (log -inf) the power is 0 for beta > 1
        local = torch.mul(log_abs, beta - 1.0).exp_().mul_(t.sign_()).mul_(-2.0 * beta).mul_(dh)
        ctx.save_for_backward(local)
        return v.numel() - log_abs.mul_(beta).exp_().sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (local,) = ctx.saved_tensors
        return grad * local, None


class _AbsPow(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, p: float) -> torch.Tensor:
        log_abs = x.abs().log_()
        if x.requires_grad:
            ctx.save_for_backward(torch.mul(log_abs, p - 1.0).exp_().mul_(x.sign()).mul_(p))
        return log_abs.mul_(p).exp_()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (local,) = ctx.saved_tensors
        return grad * local, None


def soft_weight(v: torch.Tensor, w_floor: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, quant_min: int,
                quant_max: int) -> torch.Tensor:
    """AdaRound's ``W_soft`` (module docstring); ``scale`` and ``zero`` broadcast against ``v``."""
    return _SoftWeight.apply(v, w_floor, scale, zero, quant_min, quant_max)  # type: ignore[no-any-return]


def rounding_regularizer(v: torch.Tensor, beta: float) -> torch.Tensor:
    """AdaRound's ``sum_i 1 - |2 h(V_i) - 1|^beta`` (0-d). ``beta <= 1`` (whose power has no finite or no zero
    derivative at ``h = 1/2``) takes autograd's expression."""
    if beta <= 1.0:
        return (1.0 - (2.0 * rectified_sigmoid(v) - 1.0).abs().pow(beta)).sum()
    return _RoundingRegularizer.apply(v, float(beta))  # type: ignore[no-any-return]


def abs_pow(x: torch.Tensor, p: float) -> torch.Tensor:
    """``|x|^p`` elementwise (BRECQ's Lp error): ``exp(p log|x|)`` for ``p > 1``, ``x * x`` for ``p == 2``, autograd's
    ``pow`` for ``p <= 1``."""
    if p <= 1.0:
        return x.abs().pow(p)
    if p == 2.0:
        return x * x
    return _AbsPow.apply(x, float(p))  # type: ignore[no-any-return]
