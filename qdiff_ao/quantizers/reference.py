"""Reference Conv2d / Linear whose integer weight codes stay inside the observer's range at convert time.

torch.ao's convert step quantizes module weights with ``torch.quantize_per_channel`` /
``torch.quantize_per_tensor``, which round but never clamp to the observer's ``[quant_min, quant_max]`` (only to
the int8 container range). For 4-bit weights in int8 containers that yields codes outside [-8, 7] whenever an
observer clips (Lp range search does by design). These reference modules clamp the codes:

    q = clamp(round(W / scale) + zero_point, quant_min, quant_max)

and are registered with torch.ao's lowering table once, when this module is imported, so that convert_fx lowers
them to its native quantized Conv2d / Linear like its own reference modules.
"""

from __future__ import annotations

from typing import Any

import torch

from qdiff_ao._compat import ReferenceConv2d, ReferenceLinear, register_static_lowering

__all__ = ["ClampedReferenceConv2d", "ClampedReferenceLinear"]


def _clamp_codes(qweight: torch.Tensor, quant_min: int | None, quant_max: int | None) -> torch.Tensor:
    """Clamp a quantized weight's integer codes to [quant_min, quant_max], keeping its qparams."""
    if quant_min is None or quant_max is None:
        return qweight
    codes = qweight.int_repr()
    if int(codes.min()) >= quant_min and int(codes.max()) <= quant_max:
        return qweight
    codes = codes.clamp(quant_min, quant_max)
    if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return torch._make_per_channel_quantized_tensor(
            codes, qweight.q_per_channel_scales(), qweight.q_per_channel_zero_points(), qweight.q_per_channel_axis()
        )
    return torch._make_per_tensor_quantized_tensor(codes, qweight.q_scale(), qweight.q_zero_point())


class _ClampedWeightMixin:
    """Reference-module mixin: weights are rounded to nearest and clamped to the observer's range."""

    weight_quant_min: int | None
    weight_quant_max: int | None

    def get_quantized_weight(self) -> torch.Tensor:
        return _clamp_codes(super().get_quantized_weight(), self.weight_quant_min, self.weight_quant_max)  # type: ignore[misc]

    def get_weight(self) -> torch.Tensor:
        qweight = self.get_quantized_weight()
        return qweight.dequantize() if qweight.is_quantized else qweight


class ClampedReferenceConv2d(_ClampedWeightMixin, ReferenceConv2d):
    """torch.ao reference Conv2d whose integer weight codes respect the observer's [quant_min, quant_max]."""


class ClampedReferenceLinear(_ClampedWeightMixin, ReferenceLinear):
    """torch.ao reference Linear whose integer weight codes respect the observer's [quant_min, quant_max]."""

    @classmethod
    def from_float(cls, float_linear: torch.nn.Linear, weight_qparams: dict[str, Any]) -> ClampedReferenceLinear:
        # torch's reference Linear.from_float builds its own class, not `cls`; build ours.
        ref = cls(
            float_linear.in_features,
            float_linear.out_features,
            float_linear.bias is not None,
            device=float_linear.weight.device,
            dtype=float_linear.weight.dtype,
            weight_qparams=weight_qparams,
        )
        ref.weight = torch.nn.Parameter(float_linear.weight.detach())
        if float_linear.bias is not None:
            ref.bias = torch.nn.Parameter(float_linear.bias.detach())
        return ref


register_static_lowering(ClampedReferenceConv2d, ReferenceConv2d)
register_static_lowering(ClampedReferenceLinear, ReferenceLinear)
