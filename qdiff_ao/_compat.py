"""The one place that imports ``torch.ao.quantization``.

torch.ao's FX graph mode quantization is deprecated upstream (in favour of torchao's PT2E flow) but present in
torch 2.14 and 2.15. Every other module of qdiff_ao imports torch.ao names from here, so a PT2E front end can
replace this file alone.

``prepare_fx`` / ``convert_fx`` carry a ``typing_extensions.deprecated`` marker that warns on every call. The
versions re-exported here silence that one warning for calls made through qdiff_ao; users who call torch's own
functions still see it.

``register_static_lowering`` adds our reference modules (``qdiff_ao.quantizers.reference``) to torch.ao's
lowering table; that module calls it once, when it is imported.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

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
    "ReferenceConv2d",
    "ReferenceLinear",
    "register_static_lowering",
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


ReferenceConv2d = _nnqr.Conv2d
ReferenceLinear = _nnqr.Linear


def register_static_lowering(reference_cls: type, like: type) -> None:
    """Make torch.ao's lowering treat ``reference_cls`` like its reference module ``like`` (idempotent)."""
    table = _lowering.STATIC_LOWER_MODULE_MAP
    table.setdefault(reference_cls, table[like])
