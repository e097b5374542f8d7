"""Pure quantization math for any bit width: integer ranges, qparams, quantize, dequantize, fake-quant.

Affine (uniform) quantization with scale ``s`` and integer zero point ``z`` over the code range
``[quant_min, quant_max]``:

    q      = clamp(round(x / s) + z, quant_min, quant_max)        (round half to even, as torch does)
    x_hat  = (q - z) * s
    fq(x)  = x_hat

Everything here is stateless and works per tensor (scalar qparams) or per channel (1-d qparams broadcast along
``ch_axis``). The observers delegate their math to this module.

Example:
    >>> import torch
    >>> qrange(4, signed=True)
    (-8, 7)
    >>> scale, zp = choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), -8, 7, symmetric=True)
    >>> round(float(scale) * 7, 6), int(zp)
    (1.0, 0)
    >>> quantize(torch.tensor([0.0, 0.6, 3.0, -3.0]), scale, zp, -8, 7).tolist()
    [0.0, 4.0, 7.0, -8.0]
"""

from __future__ import annotations

import torch

__all__ = [
    "qrange",
    "choose_qparams",
    "quantize",
    "dequantize",
    "fake_quant",
    "check_finite",
    "SCALE_EPS",
]

# Smallest scale we hand out: a constant-zero tensor would otherwise give scale 0 (division by zero in
# quantize). Same order as torch.ao's default eps (float32 eps).
SCALE_EPS = float(torch.finfo(torch.float32).eps)


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range for ``bits``-bit quantization.

    Signed: [-2^(b-1), 2^(b-1) - 1]; unsigned: [0, 2^b - 1].

    Raises:
        ValueError: if ``bits`` is not in [1, 16].
    """
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise ValueError if ``x`` holds NaN or Inf (observers must not turn them into silent garbage qparams)."""
    if not x.numel():
        return
    if x.is_floating_point():  # one reduction instead of isfinite's four passes: aminmax propagates NaN
        lo, hi = torch.aminmax(x)
        if bool(torch.isfinite(lo) & torch.isfinite(hi)):
            return
    if not bool(torch.isfinite(x).all()):
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"{what} received {n_bad} NaN/Inf value(s) in a tensor of shape {tuple(x.shape)}; quantization ranges "
            "need finite inputs. Check the model/calibration data for overflow (e.g. run it in float32)."
        )


def choose_qparams(
    min_val: torch.Tensor,
    max_val: torch.Tensor,
    quant_min: int,
    quant_max: int,
    symmetric: bool = False,
    eps: float = SCALE_EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map the range [min_val, max_val] onto [quant_min, quant_max].

    The range is first widened to include 0 (so that 0 is exactly representable: padding and ReLU/SiLU zeros).

    Asymmetric:  s = (max - min) / (quant_max - quant_min),  z = clamp(quant_min - round(min / s), qmin, qmax)
    Symmetric:   z = 0 for signed ranges (the midpoint for unsigned ones) and
                 s = max(-min / (z - quant_min), max / (quant_max - z)),
                 the smallest scale with round(min/s) >= quant_min and round(max/s) <= quant_max, so no value in
                 the range is clipped; e.g. 4-bit signed uses [-8, 7] without producing the code +8 (torch.ao's
                 own symmetric observers use s = max|x| / 7.5, which yields +8 for x = max).
    Both: s >= eps.

    Args:
        min_val, max_val: tensors of equal shape (0-d for per-tensor, 1-d for per-channel).
        quant_min, quant_max: the integer code range.
        symmetric: symmetric (zero point fixed) or affine.
        eps: lower bound of the scale.

    Returns:
        (scale float32, zero_point int64), shaped like ``min_val``.

    Raises:
        ValueError: on shape mismatch, an empty code range, or min_val > max_val.
    """
    if quant_min >= quant_max:
        raise ValueError(f"quant_min ({quant_min}) must be < quant_max ({quant_max})")
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val shape {tuple(min_val.shape)} != max_val shape {tuple(max_val.shape)}")
    if bool((min_val > max_val).any()):
        raise ValueError("min_val > max_val: the observer has seen no data (call it on calibration data first)")
    lo = torch.clamp(min_val.float(), max=0.0)
    hi = torch.clamp(max_val.float(), min=0.0)
    if symmetric:
        zp_int = 0 if quant_min < 0 else (quant_min + quant_max + 1) // 2
        scale = torch.maximum(-lo / max(zp_int - quant_min, 1), hi / max(quant_max - zp_int, 1))
        scale = torch.clamp(scale, min=eps)
        zero_point = torch.full_like(scale, zp_int, dtype=torch.int64)
        return scale, zero_point
    scale = torch.clamp((hi - lo) / float(quant_max - quant_min), min=eps)
    zero_point = torch.clamp(quant_min - torch.round(lo / scale), quant_min, quant_max).to(torch.int64)
    return scale, zero_point


def _broadcast(p: torch.Tensor, x: torch.Tensor, ch_axis: int | None) -> torch.Tensor:
    if ch_axis is None or p.dim() == 0:
        return p
    axis = ch_axis % x.dim()
    if p.numel() != x.shape[axis]:
        raise ValueError(
            f"per-channel qparams have {p.numel()} entries but the tensor has {x.shape[axis]} channels on "
            f"ch_axis={ch_axis} (shape {tuple(x.shape)})"
        )
    shape = [1] * x.dim()
    shape[axis] = -1
    return p.reshape(shape)


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """q = clamp(round(x / s) + z, quant_min, quant_max), returned as float tensor of integral values."""
    s = _broadcast(torch.as_tensor(scale, dtype=torch.float32), x, ch_axis)
    z = _broadcast(torch.as_tensor(zero_point), x, ch_axis).to(torch.float32)
    return torch.clamp(torch.round(x / s) + z, quant_min, quant_max)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, ch_axis: int | None = None
) -> torch.Tensor:
    """x_hat = (q - z) * s."""
    s = _broadcast(torch.as_tensor(scale, dtype=torch.float32), q, ch_axis)
    z = _broadcast(torch.as_tensor(zero_point), q, ch_axis).to(torch.float32)
    return (q - z) * s


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    ch_axis: int | None = None,
) -> torch.Tensor:
    """fq(x) = dequantize(quantize(x)): the float value the integer kernel will see for x."""
    return dequantize(quantize(x, scale, zero_point, quant_min, quant_max, ch_axis), scale, zero_point, ch_axis)
