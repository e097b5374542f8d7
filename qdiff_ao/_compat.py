"""The one place that imports ``torch.ao.quantization``.

torch.ao's FX graph mode quantization is deprecated upstream (in favour of torchao's PT2E flow) but present in
torch 2.14 and 2.15. Every other module of qdiff_ao imports torch.ao names from here, so a PT2E front end can
replace this file alone.

``prepare_fx`` / ``convert_fx`` carry a ``typing_extensions.deprecated`` marker that warns on every call. The
versions re-exported here silence that one warning for calls made through qdiff_ao; users who call torch's own
functions still see it.

torch.ao's convert step quantizes module weights with ``torch.quantize_per_channel`` /
``torch.quantize_per_tensor``, which round but never clamp to the observer's ``[quant_min, quant_max]`` (only to
the int8 container range). For 4-bit weights in int8 containers that yields codes outside [-8, 7] whenever an
observer clips (Lp range search does by design). ``ClampedReferenceConv2d`` / ``ClampedReferenceLinear`` clamp the
integer codes to the observer's range; ``register_clamped_reference_modules`` tells torch.ao's lowering to treat
them like its own reference modules (an entry added to its lowering table, once).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.ao.nn.quantized import reference as _nnqr
from torch.ao.quantization import (
    MinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
    PlaceholderObserver,
    QConfig,
    QConfigMapping,
    get_default_qconfig_mapping,
)
from torch.ao.quantization.backend_config import (
    BackendConfig,
    BackendPatternConfig,
    DTypeConfig,
    DTypeWithConstraints,
    ObservationType,
)
from torch.ao.quantization.fx import _lower_to_native_backend as _lowering
from torch.ao.quantization.fx.custom_config import ConvertCustomConfig, PrepareCustomConfig
from torch.ao.quantization.quantize_fx import convert_fx as _convert_fx
from torch.ao.quantization.quantize_fx import convert_to_reference_fx as _convert_to_reference_fx
from torch.ao.quantization.quantize_fx import prepare_fx as _prepare_fx

__all__ = [
    "BackendConfig",
    "BackendPatternConfig",
    "ClampedReferenceConv2d",
    "ClampedReferenceLinear",
    "ConvertCustomConfig",
    "DTypeConfig",
    "DTypeWithConstraints",
    "MinMaxObserver",
    "ObservationType",
    "ObserverBase",
    "PerChannelMinMaxObserver",
    "PlaceholderObserver",
    "PrepareCustomConfig",
    "QConfig",
    "QConfigMapping",
    "convert_fx",
    "convert_to_reference_fx",
    "get_default_qconfig_mapping",
    "prepare_fx",
    "register_clamped_reference_modules",
]

_F = TypeVar("_F", bound=Callable[..., Any])


def _quiet_deprecation(fn: _F) -> _F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao\.quantization")
            warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecat.*")
            warnings.filterwarnings("ignore", message=r".*deprecated.*torchao.*")
            # convert_fx builds quantized tensors; torch 2.14 flags their creation functions as deprecated.
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


prepare_fx = _quiet_deprecation(_prepare_fx)
convert_fx = _quiet_deprecation(_convert_fx)
convert_to_reference_fx = _quiet_deprecation(_convert_to_reference_fx)


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


class ClampedReferenceConv2d(_ClampedWeightMixin, _nnqr.Conv2d):
    """torch.ao reference Conv2d whose integer weight codes respect the observer's [quant_min, quant_max]."""


class ClampedReferenceLinear(_ClampedWeightMixin, _nnqr.Linear):
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


def register_clamped_reference_modules() -> None:
    """Let torch.ao lower our clamped reference modules to its native quantized Conv2d / Linear (idempotent)."""
    table = _lowering.STATIC_LOWER_MODULE_MAP
    table.setdefault(ClampedReferenceConv2d, table[_nnqr.Conv2d])
    table.setdefault(ClampedReferenceLinear, table[_nnqr.Linear])
