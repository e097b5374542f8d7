"""Which layers can run on torch's cuDNN INT8 kernels (QuantizedCUDA); ``CudnnBackend`` lowers only those.

Each rule cites PyTorch's C++ source (``aten/src/ATen/native/quantized/cudnn/``; its error messages match the
strings in torch 2.14.1's ``libtorch_cuda.so``) and the installed dispatcher (``torch._C._dispatch_dump``):
QuantizedCUDA kernels exist for ``quantized::conv1d[_relu]``, ``conv2d[_relu].new`` (Conv.cpp),
``conv1d_prepack`` / ``conv2d_prepack`` (ConvPrepack.cpp), ``linear[_relu]`` (Linear.cpp), ``linear_prepack``
(LinearPrepack.cpp), ``add[_relu]`` (BinaryOps.cpp); none for transposed or 3-d convs. GUESS: not decided by
torch's code (a cuDNN engine limit, unverified without a GPU).

    rule                               layers        source: function
    quantized qint8 activations        conv, linear  Conv.cpp, Linear.cpp: apply_impl (QInt8 output),
                                                     apply_impl_helper (reads the input as int8)
    activation zero points 0 (in+out)  conv, linear  Conv.cpp: PackedConvWeightCudnn::apply_impl (numerics:
                                                     requantizes with scales only), Linear.cpp:
                                                     apply_impl_helper; unchecked by torch (wrong values)
    weights per-tensor affine          conv, linear  ConvPrepack.cpp / LinearPrepack.cpp: prepack
    weights qint8, zero point 0        conv, linear  apply_impl_helper (int8 reads), the numerics above
    groups == 1; not transposed        conv          ConvPrepack.cpp: PackedConvWeightCudnn::prepack
    2-d (1-d runs as 2-d), not 3-d     conv          prepack; ConvPrepack.cpp QConv1dPackWeightInt8Cudnn::_run
    integer padding, no 'same'/'valid' conv          torch/ao/nn/quantized/modules/conv.py: Conv2d.__init__
    padding_mode 'zeros'               conv          conv.py: Conv2d.forward (F.pad; no QuantizedCUDA
                                                     reflection/replication pad; 'circular': GUESS)
    dilation 1                         conv          GUESS: Conv.cpp passes it to cuDNN unchecked; torch's
                                                     test_qconv*_cudnn verify dilation 1 only
    2-d input (rows, in_features)      linear        Linear.cpp: PackedLinearWeightCudnn::apply_impl
    in/out features multiple of 4      linear        GUESS: LinearPrepack.cpp does not pad (convs are padded
                                                     in ConvPrepack.cpp prepack and Conv.cpp apply_impl)
    no bias (or an all-zero one)       linear        MEASURED on a GPU (torch 2.11.0+cu130, cuDNN 9.19): the
                                                     kernel's output is the bias-free product; with the bias
                                                     the error was 9-83% (convs add theirs correctly)
    fp32 bias or none                  conv, linear  GUESS beyond fp32: apply_impl_helper scales it in fp32
    add inputs of the same shape       add           BinaryOps.cpp: add (adds stay float in qdiff_ao)

Supported without a rule: any conv channel count (torch pads to multiples of 4), stride, integer padding,
contiguous or channels_last input (Conv.cpp apply_impl converts). ``conv2d_relu`` / ``linear_relu`` exist but
are not declared (qdiff_ao's UNets use SiLU). A layer that breaks a rule stays float (qconfig None) and one log
line gives the reason. GUESS rules have not been checked on a GPU; the MEASURED one was found on one
(``benchmarks/cudnn_gpu.py`` and ``tests/test_lower_cudnn.py``, run on an H200 on 2026-12-04).

Example:
    >>> import torch
    >>> from qdiff_ao import QuantConfig
    >>> cfg = QuantConfig(weight_bits=8, act_bits=8, weight_granularity="per_tensor", act_symmetric=True,
    ...                   timestep_aware=False)
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=2)).eval()
    >>> [(d.name, d.use_cudnn) for d in plan_cudnn_lowering(torch.fx.symbolic_trace(net), cfg)]
    [('0', True), ('1', False)]
"""

from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.capture.graph_state import graph_info, has_graph_info
from qdiff_ao.config import QuantConfig

__all__ = ["LayerDecision", "plan_cudnn_lowering"]

logger = logging.getLogger(__name__)

_PER_TENSOR = (torch.per_tensor_affine, torch.per_tensor_symmetric)
_SYMMETRIC = (torch.per_tensor_symmetric, torch.per_channel_symmetric)
_LOWERED = ("conv2d", "linear")  # what CudnnBackend.backend_config declares
_PASS_THROUGH = (torch.quantize_per_tensor, "dequantize")  # nodes between a layer and its input's tensor_meta
_RANK = "the cuDNN linear takes 2-d inputs only"


@dataclass(frozen=True)
class LayerDecision:
    """Whether one layer runs on a cuDNN INT8 kernel.

    Attributes:
        name: module path (conv / linear) or node name (add).
        op: "conv2d", "linear" or "add" (the kernel it would use); "conv1d" / "conv3d" / "conv_transpose".
        kernel_ok: the layer meets every constraint of the kernel.
        use_cudnn: it will be lowered to the kernel (only conv2d / linear; adds and conv1d never are).
        reasons: the constraints it breaks (empty when ``kernel_ok`` and lowered), or why it is not lowered.
    """

    name: str
    op: str
    kernel_ok: bool
    use_cudnn: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Scheme:
    """What the kernel is fed (None: unknown): activation dtype, zero points 0, weight per-tensor/dtype/zp 0."""

    act_dtype: torch.dtype | None
    act_zero: bool | None
    weight_per_tensor: bool | None
    weight_dtype: torch.dtype | None
    weight_zero: bool | None


def _cfg_scheme(cfg: QuantConfig) -> _Scheme:
    """The scheme ``CudnnBackend().qconfig_mapping(cfg, gm)`` produces."""
    act = None if cfg.act_bits is None else torch.qint8
    return _Scheme(act, cfg.act_symmetric if act is not None else None, cfg.weight_granularity == "per_tensor",
                   torch.qint8, True)


def _observer(gm: fx.GraphModule, node: Any) -> ObserverBase | None:
    mod = gm.get_submodule(str(node.target)) if isinstance(node, fx.Node) and node.op == "call_module" else None
    return mod if isinstance(mod, ObserverBase) else None


def _observer_scheme(obs: ObserverBase) -> tuple[torch.dtype, bool, bool]:
    """(dtype, zero point 0, per tensor); torch.ao quantizes per_tensor_symmetric weights as per_tensor_affine."""
    qscheme = getattr(obs, "qscheme", torch.per_tensor_affine)
    return obs.dtype, qscheme in _SYMMETRIC, qscheme in _PER_TENSOR


def _module_scheme(gm: fx.GraphModule, node: fx.Node, mod: nn.Module, default: _Scheme) -> _Scheme:
    """Refine ``default`` with what a prepared (observers) or converted (quantized tensors) graph shows."""
    act_dtype, act_zero = default.act_dtype, default.act_zero
    w_pt, w_dtype, w_zero = default.weight_per_tensor, default.weight_dtype, default.weight_zero
    src = node.args[0] if node.args else None
    out = next(iter(node.users)) if len(node.users) == 1 else None
    observed = [_observer_scheme(o) for o in (_observer(gm, src), _observer(gm, out)) if o is not None]
    if observed:  # prepared graph: the input and output observers
        dtypes = [s[0] for s in observed]
        act_dtype = None if torch.float in dtypes else next((d for d in dtypes if d != torch.qint8), torch.qint8)
        act_zero = all(s[1] for s in observed)
    if isinstance(src, fx.Node) and src.target == torch.quantize_per_tensor and len(src.args) == 4:
        zp = src.args[2]  # converted graph: the input's quantize node
        zp = getattr(gm, str(zp.target)) if isinstance(zp, fx.Node) and zp.op == "get_attr" else zp
        act_dtype, act_zero = cast(torch.dtype, src.args[3]), bool(act_zero) and int(cast(Any, zp)) == 0
    qconfig = getattr(mod, "qconfig", None)
    weight = getattr(mod, "weight", None)
    if qconfig is not None and qconfig.weight is not None:
        w_dtype, w_zero, w_pt = _observer_scheme(qconfig.weight())
    elif callable(weight) and not isinstance(weight, torch.Tensor):  # torch.ao quantized module
        qweight = weight()
        w_dtype = qweight.dtype
        w_pt = qweight.qscheme() == torch.per_tensor_affine  # exactly what the prepacks accept
        zero_points = qweight.q_zero_point() if w_pt else qweight.q_per_channel_zero_points()
        w_zero = bool(torch.as_tensor(zero_points).eq(0).all())
        act_zero = bool(act_zero) and int(getattr(mod, "zero_point", 0)) == 0  # output zero point
    elif hasattr(mod, "weight_qscheme"):  # torch.ao reference module
        w_pt = mod.weight_qscheme in _PER_TENSOR
        w_dtype = cast(torch.dtype, mod.weight_dtype)  # plain attributes of torch.ao reference modules
        w_zero = bool(torch.as_tensor(mod.weight_zero_point).eq(0).all())
    return _Scheme(act_dtype, act_zero, w_pt, w_dtype, w_zero)


def _scheme_reasons(s: _Scheme) -> list[str]:
    """Activation / weight rules of conv and linear: cudnn/Conv.cpp, Linear.cpp, ConvPrepack.cpp, LinearPrepack.cpp."""
    reasons = []
    if s.act_dtype is None:
        reasons.append("activations stay float (weights-only config): the cuDNN kernels take quantized qint8 "
                       "activations (Conv.cpp / Linear.cpp apply_impl)")
    elif s.act_dtype != torch.qint8:
        reasons.append(f"activations are {s.act_dtype}, the cuDNN kernels read qint8 (Conv.cpp / Linear.cpp "
                       "apply_impl_helper); use qdiff_ao.backends.CudnnBackend")
    elif s.act_zero is False:
        reasons.append("affine activations (zero point != 0): the cuDNN kernels ignore zero points (Conv.cpp "
                       "PackedConvWeightCudnn::apply_impl numerics); use QuantConfig(act_symmetric=True)")
    if s.weight_per_tensor is False:
        reasons.append("per-channel weights: the cuDNN prepacks accept per-tensor weights only ('Unsupported "
                       "qscheme', ConvPrepack.cpp / LinearPrepack.cpp prepack); use weight_granularity='per_tensor'")
    if s.weight_dtype is not None and s.weight_dtype != torch.qint8:
        reasons.append(f"weights are {s.weight_dtype}, the cuDNN kernels read qint8 (apply_impl_helper)")
    if s.weight_zero is False:
        reasons.append("weights with nonzero zero point: the cuDNN kernels ignore it (Conv.cpp apply_impl "
                       "numerics, Linear.cpp apply_impl_helper)")
    return reasons


def _bias(mod: nn.Module) -> torch.Tensor | None:
    """The bias of a float module, or of a torch.ao quantized one (there a method, ``bias()``)."""
    bias = getattr(mod, "bias", None)
    bias = bias() if callable(bias) and not isinstance(bias, torch.Tensor) else bias
    return bias if isinstance(bias, torch.Tensor) else None


def _bias_reasons(mod: nn.Module) -> list[str]:
    """GUESS beyond fp32: cudnn/Conv.cpp and Linear.cpp apply_impl_helper scale the bias with an fp32 tensor."""
    bias = _bias(mod)
    if bias is not None and bias.dtype != torch.float32:
        return [f"bias is {bias.dtype} (GUESS: only fp32 bias is exercised by torch's cuDNN kernels and tests)"]
    return []


def _conv_reasons(mod: nn.Module) -> tuple[str, list[str]]:
    """Conv rules: cudnn/ConvPrepack.cpp prepack, Conv.cpp registrations, ao/nn/quantized/modules/conv.py Conv2d."""
    dims = len(cast("tuple[int, ...]", mod.kernel_size))  # float and torch.ao convs hold int tuples
    if getattr(mod, "transposed", False):
        return "conv_transpose", ["transposed conv: 'cudNN quantized conv prepack expects transpose = false' "
                                  "(ConvPrepack.cpp prepack); no QuantizedCUDA conv_transpose kernel"]
    if dims == 3:
        return "conv3d", ["3-d conv: no QuantizedCUDA quantized::conv3d kernel (Conv.cpp registers 1-d and 2-d); "
                          "'cuDNN packing only supports 2D convolution' (ConvPrepack.cpp prepack)"]
    reasons = []
    if mod.groups != 1:
        reasons.append(f"groups={mod.groups}: 'Quantized cudnn conv2d is currently limited to groups = 1' "
                       "(ConvPrepack.cpp prepack)")
    if isinstance(mod.padding, str):
        reasons.append(f"padding={mod.padding!r}: torch.ao's quantized Conv passes it to conv2d_prepack, which "
                       "takes integers (ao/nn/quantized/modules/conv.py Conv2d.__init__)")
    if getattr(mod, "padding_mode", "zeros") != "zeros":
        reasons.append(f"padding_mode={mod.padding_mode!r}: quantized Conv pads it with F.pad (conv.py "
                       "Conv2d.forward); reflection/replication pads have no QuantizedCUDA kernel (circular: GUESS)")
    dilation = cast("tuple[int, ...]", mod.dilation)
    if any(d != 1 for d in dilation):
        reasons.append(f"dilation={tuple(dilation)} (GUESS: Conv.cpp passes it to cuDNN unchecked; torch's "
                       "test_qconv*_cudnn verify dilation 1 only)")
    return f"conv{dims}d", reasons + _bias_reasons(mod)


def _input_shape(gm: fx.GraphModule, node: fx.Node) -> tuple[int, ...] | None:
    """Shape of a layer's input from ``tensor_meta`` (qdiff_ao.trace), looking through observers / quantize."""
    src = node.args[0] if node.args else None
    for _ in range(4):
        if not isinstance(src, fx.Node) or getattr(src.meta.get("tensor_meta"), "shape", None) is not None:
            return tuple(src.meta["tensor_meta"].shape) if isinstance(src, fx.Node) else None
        if not src.args or (_observer(gm, src) is None and src.target not in _PASS_THROUGH):
            return None
        src = src.args[0]
    return None


def _linear_reasons(mod: nn.Module, shape: tuple[int, ...] | None, recorded: LayerDecision | None) -> list[str]:
    """Linear rules: cudnn/Linear.cpp apply_impl (2-d input; from ``recorded`` without ``shape``), features GUESS."""
    reasons = []
    if shape is None and recorded is not None:
        reasons += [r for r in recorded.reasons if _RANK in r]
    elif shape is None:
        reasons.append(f"input shape unknown: {_RANK} (plan on the graph from qdiff_ao.trace, which records "
                       "tensor_meta, or keep the decisions CudnnBackend.prepare records in the graph info)")
    elif len(shape) != 2:
        reasons.append(f"{len(shape)}-d input {shape}: {_RANK}; it views its input as (1, size(0), in_features) "
                       "(Linear.cpp PackedLinearWeightCudnn::apply_impl)")
    features = (("in_features", cast(int, mod.in_features)), ("out_features", cast(int, mod.out_features)))
    bad = [f"{k}={v}" for k, v in features if v % 4]
    if bad:
        reasons.append(f"{', '.join(bad)} not a multiple of 4 (GUESS: cuDNN int8 matmul alignment; unlike convs, "
                       "LinearPrepack.cpp does not pad)")
    return reasons + _bias_reasons(mod) + _linear_bias_reasons(mod)


def _linear_bias_reasons(mod: nn.Module) -> list[str]:
    """MEASURED: torch's QuantizedCUDA ``quantized::linear`` returns the bias-free result (see module docstring)."""
    bias = _bias(mod)
    if bias is not None and bool(bias.detach().ne(0).any()):
        return ["nonzero bias: torch's cuDNN quantized::linear drops it (MEASURED on an H200, torch 2.11.0+cu130, "
                "cuDNN 9.19: outputs equal the bias-free product to 1e-7; tests/test_lower_cudnn.py checks it)"]
    return []


def _add_decision(node: fx.Node) -> LayerDecision | None:
    """cudnn/BinaryOps.cpp add: both inputs the same shape (no broadcasting)."""
    if node.op != "call_function" or node.target not in (torch.add, operator.add):
        return None
    args = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(args) != 2:
        return None
    shapes: list[Any] = [getattr(a.meta.get("tensor_meta"), "shape", None) for a in args]  # torch.Size or None
    reasons = []
    if any(s is None for s in shapes):
        reasons.append("operand shapes unknown (plan on the graph from qdiff_ao.trace, before prepare, to check the "
                       "add kernel's shape rule)")
    elif tuple(shapes[0]) != tuple(shapes[1]):
        reasons.append(f"shapes {tuple(shapes[0])} and {tuple(shapes[1])} differ: 'Quantized cudnn add currently "
                       "expects both input tensors to be the same shape' (BinaryOps.cpp add)")
    kernel_ok = not reasons
    return LayerDecision(node.name, "add", kernel_ok, False,
                         tuple(reasons) + ("qdiff_ao keeps adds in float (only conv/linear inputs are quantized)",))


def plan_cudnn_lowering(
    model: fx.GraphModule, cfg: QuantConfig, *, include_adds: bool = False, log: bool = True
) -> list[LayerDecision]:
    """Decide, layer by layer, which Conv2d / Linear can run on torch's cuDNN INT8 kernels.

    Args:
        model: a traced graph (:func:`qdiff_ao.trace`: its ``tensor_meta`` gives linear input shapes), a prepared
            one (its observers are checked) or a converted one (its quantized tensors); without ``tensor_meta``
            linear input shapes come from the decisions recorded in the graph info (``CudnnBackend.prepare``
            records them and ``convert`` carries them), else such linears stay float.
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
    recorded_decisions = graph_info(model).cudnn_decisions if has_graph_info(model) else None
    recorded = {d.name: d for d in recorded_decisions or ()}
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
            op, reasons = "linear", _linear_reasons(mod, _input_shape(model, node), recorded.get(str(node.target)))
        else:
            continue
        seen.add(str(node.target))
        reasons = _scheme_reasons(_module_scheme(model, node, mod, default)) + reasons
        kernel_ok = not reasons
        if kernel_ok and op not in _LOWERED:
            reasons.append(f"{op} fits the kernel, but qdiff_ao's cuDNN BackendConfig declares Conv2d and Linear only")
        decisions.append(LayerDecision(str(node.target), op, kernel_ok, kernel_ok and op in _LOWERED, tuple(reasons)))
    if log:
        for d in decisions:
            if not d.use_cudnn and d.op != "add":
                logger.info("cuDNN lowering: %s (%s) stays float: %s", d.name, d.op, "; ".join(d.reasons))
        n = sum(d.use_cudnn for d in decisions)
        logger.info("cuDNN lowering: %d of %d conv/linear layers qualify", n,
                    sum(d.op != "add" for d in decisions))
    return decisions


