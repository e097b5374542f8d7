"""The one conversion from a torch.ao observer to the qparams of the quantizer it stands for.

Reconstruction (the fake-quant simulation), output bias correction (through the simulation), softmax freezing and
ONNX export all read qparams here, so a layer is simulated, exported and lowered with the same numbers:

    activation observer ──calculate_qparams()──► QParams(scale, zero_point, quant_min, quant_max, dtype, ch_axis)
    Conv2d/Linear with qconfig ──qconfig.weight() observes W──► (observer, QParams)   (what convert_fx computes)

Example:
    >>> import torch
    >>> from qdiff_ao.observers import RangeMinMaxObserver
    >>> obs = RangeMinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=255)
    >>> _ = obs(torch.tensor([0.0, 2.55]))
    >>> qp = activation_qparams(obs, "act")
    >>> round(float(qp.scale), 4), int(qp.zero_point), qp.ch_axis
    (0.01, 0, None)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard, cast

import torch
from torch import nn

from qdiff_ao._compat import ObserverBase, PlaceholderObserver, QConfig

__all__ = ["QParams", "activation_qparams", "is_quantized_layer", "weight_observer", "weight_qparams"]

QUANT_DTYPES = (torch.quint8, torch.qint8, torch.qint32)
_PER_CHANNEL = (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams)


@dataclass(frozen=True)
class QParams:
    """Affine qparams: fq(x) = (clamp(round(x / scale) + zero_point, quant_min, quant_max) - zero_point) * scale.

    Attributes:
        scale, zero_point: as the observer returned them (one element per tensor, or 1-d per channel).
        quant_min, quant_max: the integer code range.
        dtype: the container dtype (``torch.quint8`` / ``qint8`` / ``qint32``).
        ch_axis: the channel axis of per-channel qparams, None per tensor.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    dtype: torch.dtype
    ch_axis: int | None


def activation_qparams(observer: ObserverBase, name: str) -> QParams | None:
    """The qparams of a calibrated activation observer (None: it keeps the tensor in float).

    Raises:
        ValueError: the observer has seen no data (calibrate first).
    """
    if isinstance(observer, PlaceholderObserver) or getattr(observer, "dtype", None) not in QUANT_DTYPES:
        return None
    try:
        scale, zero_point = observer.calculate_qparams()
    except RuntimeError as err:
        raise ValueError(
            f"activation observer {name!r} has no qparams ({err}); run qdiff_ao.calibrate(prepared, calib) on "
            "the prepared model first"
        ) from None
    ch_axis = int(getattr(observer, "ch_axis", 1)) if scale.numel() != 1 else None
    qmin, qmax = int(cast(int, observer.quant_min)), int(cast(int, observer.quant_max))
    return QParams(scale, zero_point, qmin, qmax, observer.dtype, ch_axis)


def is_quantized_layer(module: nn.Module) -> TypeGuard[nn.Conv2d | nn.Linear]:
    """A Conv2d / Linear that convert_fx will quantize (it carries a qconfig with a quantized weight)."""
    qconfig = getattr(module, "qconfig", None)
    if type(module) not in (nn.Conv2d, nn.Linear) or qconfig is None or qconfig.weight is None:
        return False
    return qconfig.weight().dtype in QUANT_DTYPES


def weight_observer(layer: nn.Conv2d | nn.Linear) -> ObserverBase | None:
    """The weight observer convert_fx uses for ``layer``, after observing its weight (None: the weight stays float).

    A QAT fake-quant (``layer.weight_fake_quant``) is used as it is; otherwise a fresh ``qconfig.weight()``
    observes the current weight, exactly as convert_fx does.
    """
    fake_quant = getattr(layer, "weight_fake_quant", None)
    if fake_quant is not None:
        return cast(ObserverBase, fake_quant)
    qconfig = getattr(layer, "qconfig", None)
    if qconfig is None or qconfig.weight is None:
        return None
    observer = cast(QConfig, qconfig).weight()
    if observer.dtype not in QUANT_DTYPES:
        return None
    observer(layer.weight.detach())
    return observer


def weight_qparams(layer: nn.Conv2d | nn.Linear) -> tuple[ObserverBase, QParams] | None:
    """(observer, qparams) of ``layer``'s weight as convert_fx computes them; per-tensor qparams are 0-d."""
    observer = weight_observer(layer)
    if observer is None:
        return None
    scale, zero_point = observer.calculate_qparams()
    per_channel = getattr(observer, "qscheme", None) in _PER_CHANNEL
    ch_axis = int(getattr(observer, "ch_axis", 0)) if per_channel else None
    if not per_channel:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    qmin, qmax = int(cast(int, observer.quant_min)), int(cast(int, observer.quant_max))
    return observer, QParams(scale, zero_point, qmin, qmax, observer.dtype, ch_axis)
