"""The float view of a converted (lowered) graph: every integer step as a ``torch.fake_quantize_*`` op.

A graph from ``qdiff_ao.convert`` / ``convert_fx`` holds real integer kernels (fbgemm ``quantized::*`` modules
with packed weights) that only torch runs. Other engines (ONNX Runtime, OpenVINO) take the same computation in
explicit Q/DQ form, which this view provides, built from the converted graph alone (no prepared graph, no
calibration data: a checkpoint loaded with ``QuantizedUNet.from_pretrained`` is enough):

    converted                                           fake-quant view
    quantize_per_tensor(x, s, z, quint8)         ==>    fq(x; s, z, 0..255)                    (ActivationQDQ)
    y.dequantize()                               ==>    y                                      (values already float)
    nnq.Conv2d(W_q, b; s_out, z_out)             ==>    conv(x, W_hat, b) -> fq(.; s_out, z_out)
    nnq.Linear(W_q, b; s_out, z_out)             ==>    linear(x, W_hat, b) -> fq(.; s_out, z_out)
    ClampedReference{Conv2d,Linear} (weights-only)  ==>    conv / linear(x, W_hat, b)            (float in and out)
    shape ops, float islands (GroupNorm, SiLU, softmax, matmul on dequantized values)   unchanged

with ``fq(x; s, z, lo..hi) = (clamp(round(x / s) + z, lo, hi) - z) * s`` over the *container* range (what
``quantize_per_tensor`` and the kernels' requantization clamp to) and ``W_hat = (W_q - z_w) * s_w`` per output
channel, exported as int8 Q/DQ (4-bit codes stay 4-bit codes inside int8). The view computes what the integer
graph computes up to float rounding order (fbgemm accumulates in int32 and requantizes once; the view adds the
same products in float), so outputs agree within about one output LSB.
"""

from __future__ import annotations

import copy
from typing import Any, cast

import torch
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.capture.graph_state import graph_info, has_graph_info
from qdiff_ao.observers.base import CONTAINER_RANGES
from qdiff_ao.passes.attention_operands import mark_signed_attention_operands
from qdiff_ao.quantizers.qdq import ActivationQDQ, WeightQDQ
from qdiff_ao.quantizers.qparams import QParams
from qdiff_ao.quantizers.reference import ClampedReferenceConv2d, ClampedReferenceLinear

__all__ = ["fake_quant_view", "is_converted_graph"]

# What a weights-only layer lowers to: a float layer holding integer weight codes (``quantizers.reference``).
_REFERENCE = (ClampedReferenceConv2d, ClampedReferenceLinear)


def _quantized_kinds() -> tuple[type[nn.Module], type[nn.Module]]:
    import torch.ao.nn.quantized as nnq  # the torch.ao *module* classes, not torch.ao.quantization's API

    return nnq.Conv2d, nnq.Linear


def is_converted_graph(gm: nn.Module) -> bool:
    """True for a GraphModule with integer kernels (``quantize_per_tensor`` nodes or quantized modules) and no
    observers (a prepared graph may hold ``quantize_per_tensor`` calls too)."""
    if not isinstance(gm, fx.GraphModule) or any(isinstance(m, ObserverBase) for m in gm.modules()):
        return False
    kinds = _quantized_kinds()
    return any(n.op == "call_function" and n.target is torch.quantize_per_tensor for n in gm.graph.nodes) or any(
        type(m) in kinds or type(m) in _REFERENCE for m in gm.modules())


def _value(gm: fx.GraphModule, arg: Any) -> Any:
    """A quantize argument's value: a get_attr node's tensor, or the constant itself."""
    if isinstance(arg, fx.Node):
        if arg.op != "get_attr":
            raise ValueError(f"quantize_per_tensor takes its scale / zero point from node {arg.name} ({arg.op}); "
                             "the fake-quant view needs constants (a graph from qdiff_ao.convert has them)")
        value = gm
        for part in str(arg.target).split("."):
            value = getattr(value, part)
        return value
    return arg


def _float_layer(mod: Any, qweight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d | nn.Linear:
    """A float Conv2d / Linear with a (quantized or reference) module's geometry, weight W_hat = dequantize(qweight)
    and float bias."""
    layer: nn.Conv2d | nn.Linear
    if hasattr(mod, "kernel_size"):  # a Conv2d (else a Linear)
        layer = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride,
                          padding=mod.padding, dilation=mod.dilation, groups=mod.groups, bias=bias is not None,
                          padding_mode=mod.padding_mode)
    else:
        layer = nn.Linear(mod.in_features, mod.out_features, bias=bias is not None)
    layer.weight = nn.Parameter(qweight.dequantize().float(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
    return layer.eval()


def _weight_qparams(w: torch.Tensor, code_range: tuple[int, int] | None) -> QParams:
    lo, hi = code_range if code_range is not None else CONTAINER_RANGES[w.dtype]
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return QParams(w.q_per_channel_scales().float(), w.q_per_channel_zero_points().to(torch.int32), lo, hi,
                       w.dtype, int(w.q_per_channel_axis()))
    return QParams(torch.tensor(w.q_scale()), torch.tensor(w.q_zero_point()), lo, hi, w.dtype, None)


def fake_quant_view(converted: fx.GraphModule, *, float_activations: bool = False) -> fx.GraphModule:
    """A float copy of a converted graph with each quantizer as a fake-quant op (see the module docstring).

    Args:
        converted: from ``qdiff_ao.convert`` (or ``QuantizedUNet.graph_module``); not modified.
        float_activations: drop every activation quantizer instead and bake ``W_hat`` into plain float
            Conv2d / Linear layers: the weights-only model the float tail runs
            (:mod:`qdiff_ao.quantizers.float_tail`), ``conv(x, W_hat, b)`` with float ``x`` everywhere.

    Returns:
        The view; its quantized layers are ``WeightQDQ`` modules and its activation quantizers
        ``ActivationQDQ`` modules (``quantizers.qdq``), as in :func:`qdiff_ao.deploy.onnx.export.to_fake_quant_graph`.

    Raises:
        TypeError: ``converted`` is not a GraphModule.
        NotImplementedError: the graph holds an integer op the view does not know (named in the message).
    """
    if not isinstance(converted, fx.GraphModule):
        raise TypeError(f"fake_quant_view takes a converted fx.GraphModule, got {type(converted).__name__}")
    gm = copy.deepcopy(converted)
    cfg = graph_info(converted).config if has_graph_info(converted) else None
    weight_range = cfg.weight_qrange() if cfg is not None else None
    kinds = _quantized_kinds()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.quantize_per_tensor:
            names = ("input", "scale", "zero_point", "dtype")
            args = list(node.args)
            args += [node.kwargs[k] for k in names[len(args):]]
            x, scale, zero_point, dtype = args
            if float_activations:
                node.replace_all_uses_with(x)
                graph.erase_node(node)
                continue
            lo, hi = CONTAINER_RANGES[_value(gm, dtype)]
            qdq = ActivationQDQ(torch.as_tensor(_value(gm, scale), dtype=torch.float32),
                                 torch.as_tensor(_value(gm, zero_point)), lo, hi, (lo, hi))
            name = f"_fq_act_{node.name}"
            gm.add_submodule(name, qdq)
            with graph.inserting_before(node):
                new = graph.call_module(name, (x,))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        elif node.op == "call_method" and node.target == "dequantize":
            node.replace_all_uses_with(cast(fx.Node, node.args[0]))
            graph.erase_node(node)
        # Exact types: fused subclasses (ConvReLU2d, LinearReLU) carry an activation this translation would drop.
        elif node.op == "call_module" and type(gm.get_submodule(str(node.target))) in kinds:
            mod: Any = gm.get_submodule(str(node.target))
            name = str(node.target)
            qweight = mod.weight()
            gm.delete_submodule(name)
            if float_activations:
                gm.add_submodule(name, _float_layer(mod, qweight, mod.bias()))
                continue
            gm.add_submodule(name, WeightQDQ(_float_layer(mod, qweight, mod.bias()),
                                             _weight_qparams(qweight, weight_range)))
            out_lo, out_hi = CONTAINER_RANGES[torch.quint8]  # torch.ao's quantized Conv2d / Linear output quint8
            out_name = f"_fq_out_{node.name}"
            gm.add_submodule(out_name, ActivationQDQ(torch.tensor(float(mod.scale)),
                                                      torch.tensor(int(mod.zero_point)), out_lo, out_hi,
                                                      (out_lo, out_hi)))
            with graph.inserting_after(node):
                out = graph.call_module(out_name, (node,))
            node.replace_all_uses_with(out, delete_user_cb=lambda user, out=out: user is not out)
        elif node.op == "call_module" and type(gm.get_submodule(str(node.target))) in _REFERENCE:
            # Weights-only layers (no activation quantizers): float input and output, integer weight codes.
            ref: Any = gm.get_submodule(str(node.target))
            qweight = ref.get_quantized_weight()
            name = str(node.target)
            gm.delete_submodule(name)
            layer = _float_layer(ref, qweight, ref.bias)
            gm.add_submodule(name, layer if float_activations else WeightQDQ(layer, _weight_qparams(qweight,
                                                                                                    weight_range)))
        elif node.op == "call_module" and type(gm.get_submodule(str(node.target))).__module__.startswith(
                ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            raise NotImplementedError(
                f"fake_quant_view: node {node.name} runs {type(gm.get_submodule(str(node.target))).__name__}, an "
                "integer module it does not translate (it knows quantized Conv2d and Linear); export the "
                "prepared graph with export_onnx instead"
            )
        elif node.op == "call_function" and str(node.target).startswith("quantized."):
            raise NotImplementedError(f"fake_quant_view: node {node.name} calls {node.target}, an integer op it "
                                      "does not translate; export the prepared graph with export_onnx instead")
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    mark_signed_attention_operands(gm)
    return gm.eval()
