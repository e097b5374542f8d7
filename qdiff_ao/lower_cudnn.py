"""Which layers can run on torch's cuDNN INT8 kernels (QuantizedCUDA), and a torch.ao setup that lowers only those.

torch registers QuantizedCUDA kernels, built on cuDNN, for ``quantized::conv2d.new`` (``conv2d_relu``, and 1-d
convs run as 2-d), ``quantized::linear`` and ``quantized::add``. Their C++ sources are not shipped with torch; the
constraints below come from the shipped header ``ATen/native/quantized/cudnn/utils.h`` and from the error
messages compiled into ``libtorch_cuda.so`` (quoted), plus conservative rules marked as such:

    rule                                   conv2d  linear  add   source
    activations int8, zero point 0         yes     yes     yes   output tensors are created as QInt8; the kernels
                                                                  requantize with scales only (conservative)
    weights per-tensor, int8, symmetric    yes     yes     -     'Unsupported qscheme: ' (prepack)
    groups == 1                            yes     -       -     'Quantized cudnn conv2d is currently limited to
                                                                  groups = 1; received groups ='
    2-d, not transposed                    yes     -       -     'cuDNN packing only supports 2D convolution',
                                                                  'cudNN quantized conv prepack expects transpose
                                                                  = false'
    dilation 1                             yes     -       -     conservative
    channels / features multiple of 4      yes     yes     -     conservative: utils.h says cuDNN's int8 conv
                                                                  needs them and torch pads conv weights; the
                                                                  padded path is unverified here
    both inputs the same shape             -       -       yes   'Quantized cudnn add currently expects both input
                                                                  tensors to be the same shape'

A layer that breaks a rule stays float (its qconfig is set to None, so ``convert_fx`` leaves it alone) and one
log line names the layer and the reason. Nothing here has run on a GPU (this project's CI has none): the
decisions are unit-tested on CPU, the kernels are not.

Example:
    >>> import torch
    >>> from qdiff_ao import QuantConfig
    >>> cfg = QuantConfig(weight_bits=8, act_bits=8, weight_granularity="per_tensor", act_symmetric=True,
    ...                   timestep_aware=False)
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=2)).eval()
    >>> [(d.name, d.use_cudnn) for d in plan_cudnn_lowering(torch.fx.symbolic_trace(net), cfg)]
    [('0', True), ('1', False)]
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from qdiff_ao._compat import (
    BackendConfig,
    BackendPatternConfig,
    ClampedReferenceConv2d,
    ClampedReferenceLinear,
    DTypeConfig,
    ObservationType,
    ObserverBase,
    QConfig,
    QConfigMapping,
    prepare_fx,
    register_clamped_reference_modules,
)
from qdiff_ao.config import QuantConfig
from qdiff_ao.observers import LpObserver, RangeMinMaxObserver
from qdiff_ao.passes.split_shortcut import split_shortcut
from qdiff_ao.primitives import qrange
from qdiff_ao.tracing import trace

__all__ = [
    "LayerDecision",
    "get_cudnn_backend_config",
    "get_cudnn_qconfig_mapping",
    "plan_cudnn_lowering",
    "prepare_cudnn",
]

logger = logging.getLogger(__name__)

_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)


@dataclass(frozen=True)
class LayerDecision:
    """Whether one layer runs on a cuDNN INT8 kernel.

    Attributes:
        name: module path (conv / linear) or node name (add).
        op: "conv2d", "linear" or "add" (the kernel it would use); "conv1d" / "conv3d" / "conv_transpose".
        kernel_ok: the layer meets every constraint of the kernel.
        use_cudnn: it will be lowered to the kernel (adds: never, qdiff_ao keeps them in float).
        reasons: the constraints it breaks (empty when ``kernel_ok``), or why it is not lowered.
    """

    name: str
    op: str
    kernel_ok: bool
    use_cudnn: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Scheme:
    """What the kernel will be fed: activation dtype / symmetry and weight qscheme / dtype (None: unknown)."""

    act_dtype: torch.dtype | None
    act_symmetric: bool | None
    weight_per_tensor: bool | None
    weight_dtype: torch.dtype | None
    weight_symmetric: bool | None


def _cfg_scheme(cfg: QuantConfig) -> _Scheme:
    """The scheme ``get_cudnn_qconfig_mapping(cfg)`` produces."""
    act = None if cfg.act_bits is None else torch.qint8
    return _Scheme(act, cfg.act_symmetric if act is not None else None, cfg.weight_granularity == "per_tensor",
                   torch.qint8, True)


def _observer_scheme(obs: ObserverBase) -> tuple[torch.dtype, bool, bool]:
    qscheme = getattr(obs, "qscheme", torch.per_tensor_affine)
    return obs.dtype, qscheme in _SYMMETRIC, qscheme in _PER_TENSOR


def _module_scheme(gm: fx.GraphModule, node: fx.Node, mod: nn.Module, default: _Scheme) -> _Scheme:
    """Refine ``default`` with what a prepared (observers) or converted (quantized weights) graph shows."""
    act_dtype, act_sym = default.act_dtype, default.act_symmetric
    w_pt, w_dtype, w_sym = default.weight_per_tensor, default.weight_dtype, default.weight_symmetric
    src = node.args[0] if node.args else None
    if isinstance(src, fx.Node) and src.op == "call_module":
        obs = gm.get_submodule(str(src.target))
        if isinstance(obs, ObserverBase):
            act_dtype, act_sym, _ = _observer_scheme(obs)
            if act_dtype == torch.float:
                act_dtype = None
    qconfig = getattr(mod, "qconfig", None)
    weight = getattr(mod, "weight", None)
    if qconfig is not None and qconfig.weight is not None:
        w_dtype, w_sym, w_pt = _observer_scheme(qconfig.weight())
    elif callable(weight) and not isinstance(weight, torch.Tensor):  # torch.ao quantized module
        qweight = weight()
        w_dtype = qweight.dtype
        w_pt = qweight.qscheme() in _PER_TENSOR
        zero_points = qweight.q_zero_point() if w_pt else qweight.q_per_channel_zero_points()
        w_sym = bool(torch.as_tensor(zero_points).eq(0).all())
    elif hasattr(mod, "weight_qscheme"):  # torch.ao reference module
        w_pt = mod.weight_qscheme in _PER_TENSOR
        w_dtype = mod.weight_dtype
        w_sym = bool(torch.as_tensor(mod.weight_zero_point).eq(0).all())
    return _Scheme(act_dtype, act_sym, w_pt, w_dtype, w_sym)


def _scheme_reasons(s: _Scheme) -> list[str]:
    reasons = []
    if s.act_dtype is None:
        reasons.append("activations stay float (weights-only config): cuDNN kernels take int8 activations")
    elif s.act_dtype != torch.qint8:
        reasons.append(f"activations are {s.act_dtype}, cuDNN takes qint8 (use get_cudnn_qconfig_mapping)")
    elif s.act_symmetric is False:
        reasons.append("affine activations (zero point != 0): the kernels requantize with scales only "
                       "(conservative); use QuantConfig(act_symmetric=True)")
    if s.weight_per_tensor is False:
        reasons.append("per-channel weights: cuDNN prepack accepts per-tensor weights only (torch: 'Unsupported "
                       "qscheme'); use QuantConfig(weight_granularity='per_tensor')")
    if s.weight_dtype is not None and s.weight_dtype != torch.qint8:
        reasons.append(f"weights are {s.weight_dtype}, cuDNN takes qint8")
    if s.weight_symmetric is False:
        reasons.append("weights with nonzero zero point (conservative: cuDNN takes symmetric int8 weights)")
    return reasons


def _conv_reasons(mod: nn.Module) -> tuple[str, list[str]]:
    dims = len(mod.kernel_size)
    if getattr(mod, "transposed", False):
        return "conv_transpose", ["transposed conv: 'cudNN quantized conv prepack expects transpose = false'"]
    if dims != 2:
        return f"conv{dims}d", [f"{dims}-d conv: 'cuDNN packing only supports 2D convolution'"]
    reasons = []
    if mod.groups != 1:
        reasons.append(f"groups={mod.groups}: 'Quantized cudnn conv2d is currently limited to groups = 1'")
    if any(d != 1 for d in mod.dilation):
        reasons.append(f"dilation={tuple(mod.dilation)} (conservative: cuDNN int8 conv verified for dilation 1 only)")
    if isinstance(mod.padding, str) and mod.padding != "valid":
        reasons.append(f"padding={mod.padding!r}: quantized Conv2d needs explicit integer padding")
    bad = [f"{k}={v}" for k, v in (("in_channels", mod.in_channels), ("out_channels", mod.out_channels)) if v % 4]
    if bad:
        reasons.append(f"{', '.join(bad)} not a multiple of 4 (conservative: cuDNN int8 needs multiples of 4; "
                       "torch's padding path is unverified)")
    return "conv2d", reasons


def _linear_reasons(mod: nn.Module) -> list[str]:
    bad = [f"{k}={v}" for k, v in (("in_features", mod.in_features), ("out_features", mod.out_features)) if v % 4]
    if bad:
        return [f"{', '.join(bad)} not a multiple of 4 (conservative: cuDNN int8 matmul needs multiples of 4)"]
    return []


def _add_decision(node: fx.Node) -> LayerDecision | None:
    if node.op != "call_function" or node.target not in (torch.add, operator.add):
        return None
    args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(args) != 2:
        return None
    shapes = [getattr(a.meta.get("tensor_meta"), "shape", None) for a in args]
    reasons = []
    if any(s is None for s in shapes):
        reasons.append("operand shapes unknown (plan on the graph from qdiff_ao.trace, before prepare, to check the "
                       "add kernel's shape rule)")
    elif tuple(shapes[0]) != tuple(shapes[1]):
        reasons.append(f"shapes {tuple(shapes[0])} and {tuple(shapes[1])} differ: 'Quantized cudnn add currently "
                       "expects both input tensors to be the same shape'")
    kernel_ok = not reasons
    return LayerDecision(node.name, "add", kernel_ok, False,
                         tuple(reasons) + ("qdiff_ao keeps adds in float (only conv/linear inputs are quantized)",))


def plan_cudnn_lowering(
    model: fx.GraphModule, cfg: QuantConfig, *, include_adds: bool = False, log: bool = True
) -> list[LayerDecision]:
    """Decide, layer by layer, which Conv2d / Linear can run on torch's cuDNN INT8 kernels.

    Args:
        model: a traced graph (:func:`qdiff_ao.trace`), a prepared one (its observers are checked) or a
            converted one (its quantized weights are checked).
        cfg: the quantization settings; cuDNN needs ``act_bits`` set, ``act_symmetric=True`` and
            ``weight_granularity="per_tensor"`` (codes of any ``weight_bits`` run as int8).
        include_adds: also report every tensor-tensor add (the ``quantized::add`` kernel's shape rule); adds are
            never lowered, qdiff_ao keeps them in float.
        log: log one line per layer that stays float, with the reason.

    Returns:
        One :class:`LayerDecision` per layer, in graph order.

    Raises:
        TypeError: if ``model`` is not a GraphModule or ``cfg`` not a QuantConfig.
    """
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"model must be a torch.fx.GraphModule (use qdiff_ao.trace first), got {type(model).__name__}")
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a qdiff_ao.QuantConfig, got {type(cfg).__name__}")
    default = _cfg_scheme(cfg)
    decisions = []
    seen: set[str] = set()
    for node in model.graph.nodes:
        if include_adds:
            add = _add_decision(node)
            if add is not None:
                decisions.append(add)
                continue
        if node.op != "call_module" or str(node.target) in seen:
            continue
        mod = model.get_submodule(str(node.target))
        if hasattr(mod, "kernel_size") and hasattr(mod, "in_channels"):
            op, reasons = _conv_reasons(mod)
        elif hasattr(mod, "in_features") and hasattr(mod, "out_features"):
            op, reasons = "linear", _linear_reasons(mod)
        else:
            continue
        seen.add(str(node.target))
        reasons = _scheme_reasons(_module_scheme(model, node, mod, default)) + reasons
        decisions.append(LayerDecision(str(node.target), op, not reasons, not reasons, tuple(reasons)))
    if log:
        for d in decisions:
            if not d.use_cudnn and d.op != "add":
                logger.info("cuDNN lowering: %s (%s) stays float: %s", d.name, d.op, "; ".join(d.reasons))
        n = sum(d.use_cudnn for d in decisions)
        logger.info("cuDNN lowering: %d of %d conv/linear layers qualify", n,
                    sum(d.op != "add" for d in decisions))
    return decisions


def _cudnn_qconfig(cfg: QuantConfig) -> QConfig:
    wrong = [f"{name}={getattr(cfg, name)!r} (need {need})" for name, ok, need in (
        ("act_bits", cfg.act_bits is not None, "4..8"),
        ("act_symmetric", cfg.act_symmetric, "True: zero point 0"),
        ("weight_granularity", cfg.weight_granularity == "per_tensor", "'per_tensor'"),
    ) if not ok]
    if wrong:
        raise ValueError(f"cuDNN INT8 kernels need symmetric int8 activations and per-tensor weights; got "
                         f"{', '.join(wrong)}. Build the QuantConfig with those values")
    assert cfg.act_bits is not None  # checked above; narrows the type
    act_min, act_max = qrange(cfg.act_bits, signed=True)
    act_kwargs: dict[str, Any] = dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                                      quant_min=act_min, quant_max=act_max)
    w_min, w_max = qrange(cfg.weight_bits, signed=True)
    w_kwargs: dict[str, Any] = dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                                    quant_min=w_min, quant_max=w_max)
    if cfg.range_method == "lp":
        act = LpObserver.with_args(p=cfg.lp_norm, **act_kwargs)
        weight = LpObserver.with_args(p=cfg.lp_norm, **w_kwargs)
    else:
        act = RangeMinMaxObserver.with_args(**act_kwargs)
        weight = RangeMinMaxObserver.with_args(**w_kwargs)
    return QConfig(activation=act, weight=weight)


def get_cudnn_qconfig_mapping(cfg: QuantConfig, decisions: list[LayerDecision] | None = None) -> QConfigMapping:
    """QConfigMapping for the cuDNN path: symmetric qint8 activations and per-tensor symmetric weights.

    Layers whose decision says ``use_cudnn=False`` get qconfig None, so ``convert_fx`` keeps them float; with
    ``decisions=None`` every layer is quantized. 8-bit weights use the full [-128, 127] range (``reduce_range``
    works around an int16 accumulation limit of the x86 kernels and does not apply here).

    Raises:
        ValueError: if ``cfg`` asks for weights-only, affine activations or per-channel weights.
    """
    mapping = QConfigMapping().set_global(_cudnn_qconfig(cfg))
    for d in decisions or []:
        if not d.use_cudnn and d.op != "add":
            mapping.set_module_name(d.name, None)
    return mapping


def get_cudnn_backend_config(cfg: QuantConfig | None = None) -> BackendConfig:
    """BackendConfig declaring Conv2d and Linear with qint8 input, output and weight (the cuDNN kernels' dtypes)."""
    del cfg  # one dtype combination for every bit width: codes narrower than 8 bits live in int8
    register_clamped_reference_modules()
    int8 = DTypeConfig(input_dtype=torch.qint8, output_dtype=torch.qint8, weight_dtype=torch.qint8,
                       bias_dtype=torch.float)
    config = BackendConfig("qdiff_ao_cudnn")
    for root, ref in ((nn.Conv2d, ClampedReferenceConv2d), (nn.Linear, ClampedReferenceLinear)):
        config.set_backend_pattern_config(
            BackendPatternConfig(root)
            .set_observation_type(ObservationType.OUTPUT_USE_DIFFERENT_OBSERVER_AS_INPUT)
            .set_dtype_configs([int8])
            .set_root_module(root)
            .set_reference_quantized_module(ref)
        )
    return config


def prepare_cudnn(
    model: nn.Module, cfg: QuantConfig, example_inputs: Mapping[str, torch.Tensor], *, split: bool = True
) -> tuple[fx.GraphModule, list[LayerDecision]]:
    """Trace, split skip concats, plan, and insert cuDNN-compatible observers in the layers that qualify.

    Calibrate the result, then ``convert_fx(prepared, backend_config=get_cudnn_backend_config(cfg))``. Build,
    calibrate and convert with the model and data on the CUDA device: ``convert_fx`` packs weights for the
    device they are on (CUDA tensors reach the cuDNN prepack). Unverified here: no GPU on this machine.

    Returns:
        (prepared graph, the decisions).
    """
    gm = model if isinstance(model, fx.GraphModule) else trace(model, dict(example_inputs))
    if split:
        gm = split_shortcut(gm)
    decisions = plan_cudnn_lowering(gm, cfg)
    prepared = prepare_fx(gm, get_cudnn_qconfig_mapping(cfg, decisions), tuple(example_inputs.values()),
                          backend_config=get_cudnn_backend_config(cfg))
    prepared.meta["qdiff_config"] = cfg
    prepared.meta["qdiff_cudnn_decisions"] = decisions
    return prepared, decisions
