"""The torch.ao plug-in surface: ``QConfigMapping`` and ``BackendConfig`` for ``prepare_fx`` / ``convert_fx``.

What gets quantized (Q-Diffusion's scheme, lowered to fbgemm/x86 INT8 kernels):

    conv2d / linear      input: act_bits (uint8 container), weight: weight_bits (int8 container, per channel),
                         output: act_bits (the integer kernel requantizes its output)
    attention matmuls    inputs Q, K, V at act_bits; the softmax output at softmax_bits (zero point 0) is
                         observed by ``passes.observe_softmax`` (a QConfig cannot give softmax a float input and
                         a quantized output); the matmuls run on dequantized values, or as quantized::matmul
                         where torch.ao's lowering finds dq -> matmul -> q
    everything else      float: GroupNorm, SiLU, residual adds, the concat of skip connections, the sinusoidal
                         timestep embedding and integer timestep arithmetic (never observed: only the patterns
                         below get observers, so int64 nodes such as ``timesteps * ones(B)`` cannot reach one)

With ``act_bits=None`` (weights only), convs and linears keep float activations and become torch.ao reference
modules holding the integer weights (W4A32 / W8A32).

Example:
    >>> import torch
    >>> from qdiff_ao import QuantConfig
    >>> from qdiff_ao._compat import prepare_fx, convert_fx
    >>> cfg = QuantConfig(weight_bits=4, act_bits=8, timestep_aware=False)
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU()).eval()
    >>> x = torch.randn(2, 3, 8, 8)
    >>> prepared = prepare_fx(model, get_qconfig_mapping(cfg), (x,), backend_config=get_backend_config(cfg))
    >>> _ = prepared(x)
    >>> q = convert_fx(prepared, backend_config=get_backend_config(cfg))
    >>> w = q.get_submodule("0").weight().int_repr()
    >>> int(w.min()) >= -8 and int(w.max()) <= 7
    True
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qdiff_ao._compat import (
    BackendConfig,
    BackendPatternConfig,
    DTypeConfig,
    ObservationType,
    ObserverBase,
    PlaceholderObserver,
    QConfig,
    QConfigMapping,
)
from qdiff_ao.config import QuantConfig
from qdiff_ao.observers import (
    EMAMinMaxObserver,
    LpObserver,
    PerChannelLpObserver,
    RangeMinMaxObserver,
    SoftmaxObserver,
    TimestepAwareObserver,
    get_observer,
)
from qdiff_ao.quantizers.reference import ClampedReferenceConv2d, ClampedReferenceLinear

__all__ = [
    "activation_observer",
    "get_backend_config",
    "get_qconfig_mapping",
    "softmax_observer",
    "weight_observer",
]

MATMUL_TARGETS: tuple[Any, ...] = (torch.matmul, torch.bmm, operator.matmul, "matmul", "bmm")
"""The matmuls the BackendConfig declares (functions and method names); ``passes.attention_operands`` finds
attention's operands from the same list."""


def activation_observer(cfg: QuantConfig) -> Callable[[], ObserverBase]:
    """Factory of the activation observer ``cfg`` asks for (None-safe: weights-only gives a float placeholder)."""
    qr = cfg.act_qrange()
    if qr is None:
        return PlaceholderObserver.with_args(dtype=torch.float)
    kwargs: dict[str, Any] = dict(
        dtype=torch.quint8,  # fbgemm kernels take uint8 activations
        qscheme=torch.per_tensor_symmetric if cfg.act_symmetric else torch.per_tensor_affine,
        quant_min=qr[0],
        quant_max=qr[1],
    )
    if cfg.act_observer is not None:
        base = get_observer(cfg.act_observer).with_args(**kwargs)
    elif cfg.range_method == "lp":
        base = LpObserver.with_args(p=cfg.lp_norm, **kwargs)
    elif cfg.running_stat:
        base = EMAMinMaxObserver.with_args(momentum=cfg.momentum, **kwargs)
    else:
        base = RangeMinMaxObserver.with_args(**kwargs)
    return TimestepAwareObserver.with_args(base=base) if cfg.timestep_aware else base


def weight_observer(cfg: QuantConfig) -> Callable[[], ObserverBase]:
    """Factory of the weight observer: signed symmetric, per output channel (axis 0) by default."""
    quant_min, quant_max = cfg.weight_qrange()
    per_channel = cfg.weight_granularity == "per_channel"
    kwargs: dict[str, Any] = dict(
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        quant_min=quant_min,
        quant_max=quant_max,
    )
    if cfg.weight_observer is not None:
        return get_observer(cfg.weight_observer).with_args(**kwargs)
    if cfg.range_method == "lp":
        if per_channel:
            return PerChannelLpObserver.with_args(p=cfg.lp_norm, **kwargs)
        return LpObserver.with_args(p=cfg.lp_norm, **kwargs)
    return RangeMinMaxObserver.with_args(**kwargs)


def softmax_observer(cfg: QuantConfig) -> Callable[[], ObserverBase]:
    """Factory of the observer of attention probabilities: unsigned, zero point 0, ``cfg.softmax_bits``."""
    base = SoftmaxObserver.with_args(bits=cfg.softmax_bits)
    return TimestepAwareObserver.with_args(base=base) if cfg.timestep_aware else base


def get_qconfig_mapping(cfg: QuantConfig | None = None) -> QConfigMapping:
    """The ``QConfigMapping`` for ``prepare_fx``: which observer each quantized op gets.

    Use it together with :func:`get_backend_config` of the same ``cfg``.
    """
    cfg = cfg or QuantConfig()
    layer_qconfig = QConfig(activation=activation_observer(cfg), weight=weight_observer(cfg))
    mapping = QConfigMapping().set_global(layer_qconfig)
    for name in cfg.keep_float:
        mapping.set_module_name(name, None)
    return mapping


def get_backend_config(cfg: QuantConfig | None = None) -> BackendConfig:
    """The ``BackendConfig`` (fbgemm/x86 INT8 kernels) for ``prepare_fx`` and ``convert_fx``.

    Only Conv2d and Linear modules (and, with attention quantization, the attention matmuls) are declared,
    so nothing else is observed. Convs and linears lower to torch.ao's reference modules with weight codes
    clamped to the observer's range (see ``_compat``), and from there to fbgemm's quantized modules.
    """
    cfg = cfg or QuantConfig()
    if cfg.act_bits is None:
        weighted = DTypeConfig(input_dtype=torch.float, output_dtype=torch.float, weight_dtype=torch.qint8,
                               bias_dtype=torch.float)
    else:
        weighted = DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.quint8, weight_dtype=torch.qint8,
                               bias_dtype=torch.float)
    use_input_obs = ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT
    config = BackendConfig("qdiff_ao_x86")
    for root, ref in ((nn.Conv2d, ClampedReferenceConv2d), (nn.Linear, ClampedReferenceLinear)):
        config.set_backend_pattern_config(
            BackendPatternConfig(root)
            .set_observation_type(use_input_obs)
            .set_dtype_configs([weighted])
            .set_root_module(root)
            .set_reference_quantized_module(ref)
        )
    if cfg.act_bits is not None and cfg.quantize_attention:
        matmul_in = DTypeConfig(input_dtype=torch.quint8, output_dtype=torch.float)
        for target in MATMUL_TARGETS:
            config.set_backend_pattern_config(
                BackendPatternConfig(target).set_observation_type(use_input_obs).set_dtype_configs([matmul_in])
            )
    return config
