"""Export a calibrated prepared graph to ONNX with QuantizeLinear / DequantizeLinear pairs (explicit quantization).

The QDQ form is what ONNX Runtime's INT8 kernels and TensorRT's explicit-quantization path consume. The export
goes through an intermediate torch graph in which every quantizer is a ``torch.fake_quantize_*`` call with our
qparams; the TorchScript ONNX exporter (opset >= 13) turns each of those calls into a Q/DQ pair:

    prepared (after calibration)                 export copy (torch)                         ONNX
    x ─ obs ─ conv(W) ─ obs ─ ...     ==>    x ─ fq(s, z) ─ conv(fq_ch(W_hat)) ─ fq ─   ==>   x ─ Q ─ DQ ─ Conv ─ Q ─ DQ
                                                                                          W_hat ─ Q ─ DQ ─┘   │
                                                                                          b_int32 ─ DQ ───────┘

* activation observers (uint8 / int8 containers) become per-tensor Q/DQ with the observer's scale and zero point;
  an observer whose code range is narrower than its container (e.g. 7-bit) gets a float ``Clip`` to the range
  in front of Q, so the codes stay inside ``[quant_min, quant_max]``;
* weights of quantized Conv2d / Linear modules (both halves of split shortcut convs included) are rounded and
  clamped to the observer's code range first (W_hat = (clamp(round(W / s) + z, quant_min, quant_max) - z) * s),
  then exported with per-channel (axis 0) int8 Q/DQ. 4-bit weights are int8 codes in [-8, 7]; the ranges are
  recorded in the model's ``metadata_props`` (``qdiff_ao.weight_ranges``);
* biases of Conv / Gemm nodes become int32 DQ(b_q) with scale s_x * s_w (per output channel), zero point 0:
  b_q = round(b / (s_x * s_w)), as ONNX Runtime needs to fuse DQ -> Conv -> Q into an integer QLinearConv;
* 16-bit softmax observers (qint32 container: QuantizeLinear has no 16-bit type at opset < 21) are exported as
  float arithmetic ``(clamp(round(x / s) + z, quant_min, quant_max) - z) * s``, no Q/DQ.

TensorRT accepts only int8 Q/DQ with zero point 0: export with ``signed_activations=True`` (uint8 codes
q re-encoded as int8 codes q - 128 with zero point z - 128, numerically identical) from a model calibrated with
``QuantConfig(act_symmetric=True)``. :class:`OnnxExportReport` counts the nonzero zero points.

Example:
    >>> import torch, qdiff_ao
    >>> from qdiff_ao.deploy.onnx.export import export_onnx, to_fake_quant_graph
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    >>> x = {"input": torch.randn(2, 3, 8, 8)}
    >>> cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8, timestep_aware=False)
    >>> prepared = qdiff_ao.prepare(net, cfg, x)
    >>> _ = prepared(**x)                                              # calibration
    >>> fake_quant, counts = to_fake_quant_graph(prepared)             # what the ONNX graph computes
    >>> counts
    {'activation_qdq': 4, 'weight_qdq': 2, 'float_fake_quant': 0}
    >>> report = export_onnx(prepared, "net.onnx", x)                  # doctest: +SKIP
    >>> report.activation_qdq + report.weight_qdq                     # doctest: +SKIP
    6
"""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.capture.graph_state import graph_info, has_graph_info
from qdiff_ao.deploy.fake_quant_view import fake_quant_view, is_converted_graph
from qdiff_ao.deploy.onnx.graph_edit import quantize_biases
from qdiff_ao.deploy.onnx.integer_math import cast_integer_math_inputs
from qdiff_ao.deploy.timestep_dispatch import converted_for_group, prepared_for_group
from qdiff_ao.observers.base import CONTAINER_RANGES
from qdiff_ao.passes.attention_operands import mark_signed_attention_operands
from qdiff_ao.quantizers.fixed import FixedFakeQuantize
from qdiff_ao.quantizers.qdq import ActivationQDQ, WeightQDQ
from qdiff_ao.quantizers.qparams import activation_qparams, weight_qparams
from qdiff_ao.quantizers.timestep_grids import TimestepGroupGrids

__all__ = ["OnnxExportReport", "export_onnx", "to_fake_quant_graph"]

logger = logging.getLogger(__name__)

_QDQ_CONTAINERS = (torch.quint8, torch.qint8)
_MIN_OPSET, _MAX_OPSET = 13, 20


@dataclass(frozen=True)
class OnnxExportReport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ONNX file.
        activation_qdq: activation quantizers exported as a QuantizeLinear / DequantizeLinear pair.
        weight_qdq: quantized Conv2d / Linear weights exported as a per-channel (or per-tensor) Q/DQ pair.
        float_fake_quant: quantizers with no ONNX integer type (16-bit softmax), exported as float arithmetic.
        quantized_biases: biases rewritten as int32 DequantizeLinear inputs of Conv / Gemm nodes.
        nonzero_zero_points: activation quantizers whose exported zero point is not 0 (TensorRT refuses them).
        weight_ranges: ``{module name: (quant_min, quant_max)}`` of every exported weight.
    """

    path: str
    activation_qdq: int
    weight_qdq: int
    float_fake_quant: int
    quantized_biases: int
    nonzero_zero_points: int
    weight_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)


def _observed_names(prepared: fx.GraphModule) -> set[str] | None:
    attrs = prepared.meta.get("_observed_graph_module_attrs")
    names = getattr(attrs, "observed_node_names", None)
    return set(names) if names is not None else None


def to_fake_quant_graph(
    prepared: fx.GraphModule, *, quantize_bias: bool = True
) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of a calibrated prepared graph with every quantizer as a ``torch.fake_quantize_*`` op.

    The copy computes what the QDQ ONNX graph computes (the simulated-quantization reference):
    activations ``fq(x) = (clamp(round(x / s) + z, quant_min, quant_max) - z) * s``, weights likewise per channel.

    Args:
        prepared: output of :func:`qdiff_ao.prepare` (or ``prepare_fx``) after calibration; not modified.
        quantize_bias: put the bias of each layer with a quantized input on the grid s_x * s_w (as the int32
            bias of the ONNX graph; see :func:`export_onnx`).

    Returns:
        (the copy, counts ``{"activation_qdq", "weight_qdq", "float_fake_quant"}``); each exported weight is a
        ``WeightQDQ`` module of the copy, with its code range in ``quant_range``.

    Raises:
        TypeError: if ``prepared`` is not a GraphModule.
        ValueError: if an observer has seen no data (calibrate first).
    """
    if not isinstance(prepared, fx.GraphModule):
        raise TypeError(f"prepared must be a torch.fx.GraphModule from qdiff_ao.prepare, got {type(prepared).__name__}")
    gm = copy.deepcopy(prepared)
    observed = _observed_names(prepared)
    counts = {"activation_qdq": 0, "weight_qdq": 0, "float_fake_quant": 0}
    identity: list[fx.Node] = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        name = str(node.target)
        mod = gm.get_submodule(name)
        new: nn.Module | None = None
        if isinstance(mod, FixedFakeQuantize):
            counts["float_fake_quant"] += 1  # already float arithmetic on the grid (16-bit softmax)
        elif isinstance(mod, ObserverBase):
            qparams = activation_qparams(mod, name)
            if qparams is None:  # float placeholder (weights-only): no quantizer
                identity.append(node)
                continue
            if qparams.dtype in _QDQ_CONTAINERS:
                new = ActivationQDQ(qparams.scale, qparams.zero_point, qparams.quant_min, qparams.quant_max,
                                     CONTAINER_RANGES[qparams.dtype])
                counts["activation_qdq"] += 1
            else:
                new = FixedFakeQuantize(qparams.scale, qparams.zero_point, qparams.quant_min, qparams.quant_max)
                counts["float_fake_quant"] += 1
        elif type(mod) in (nn.Conv2d, nn.Linear) and (observed is None or node.name in observed):
            found = weight_qparams(cast("nn.Conv2d | nn.Linear", mod))  # its type is checked just above
            if found is not None:
                new = WeightQDQ(cast("nn.Conv2d | nn.Linear", mod), found[1])
                counts["weight_qdq"] += 1
        if new is not None:
            gm.delete_submodule(name)
            gm.add_submodule(name, new)
    for node in identity:
        node.replace_all_uses_with(cast(fx.Node, node.args[0]))  # an observer's input node
        gm.graph.erase_node(node)
    if quantize_bias:
        _round_biases(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    mark_signed_attention_operands(gm)
    return gm, counts


def _round_biases(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), WeightQDQ):
            continue
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "call_module":
            act = gm.get_submodule(str(src.target))
            if isinstance(act, ActivationQDQ):
                cast(WeightQDQ, gm.get_submodule(str(node.target))).round_bias(act.scale)


def _signed_activations(gm: fx.GraphModule) -> None:
    """Re-encode uint8 activation quantizers as int8: codes q - 128, zero point z - 128 (same float values)."""
    for mod in gm.modules():
        if isinstance(mod, ActivationQDQ) and mod.container == (0, 255):
            mod.zero_point -= 128
            mod.container = (-128, 127)


def export_onnx(
    model: fx.GraphModule,
    path: str | os.PathLike[str],
    example_inputs: Mapping[str, torch.Tensor],
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    quantize_bias: bool = True,
    signed_activations: bool = False,
    timestep_group: int | None = None,
    ignore_float_tail: bool = False,
) -> OnnxExportReport:
    """Write a calibrated prepared graph, or a converted one, as an ONNX model with QuantizeLinear /
    DequantizeLinear pairs.

    Args:
        model: output of :func:`qdiff_ao.prepare` after calibration (observers inside), or a converted graph
            (``qdiff_ao.convert``, ``QuantizedUNet.graph_module``, a loaded checkpoint's graph; translated by
            :func:`qdiff_ao.deploy.fake_quant_view.fake_quant_view`); not modified.
        path: the .onnx file to write.
        example_inputs: forward arguments by name, in any order (e.g. ``{"sample": ..., "timestep": ...}``).
        opset: ONNX opset, 13..20 (per-channel QuantizeLinear needs 13).
        dynamic_batch: make dim 0 of every input and output symbolic ("batch").
        quantize_bias: bias of Conv / Gemm -> int32 DQ with scale s_x * s_w (needed by ORT's QLinearConv fusion).
        signed_activations: uint8 activation codes re-encoded as int8 (q - 128, z - 128); TensorRT needs int8.
        timestep_group: for a graph with timestep groups (``passes.choose_timestep_groups``), the group whose
            activation qparams the file holds (an ONNX graph has one set: export one file per group and run each
            on its group's timesteps, ``graph_info(model).timestep_groups.boundaries``).
        ignore_float_tail: for a graph with a float tail (``passes.choose_float_tail``), export the integer graph
            anyway; the caller runs the tail's timesteps on ``fake_quant_view(model, float_activations=True)``.

    Returns:
        An :class:`OnnxExportReport`.

    Raises:
        ImportError: if the ``onnx`` package is missing (``pip install qdiff_ao[onnx]``).
        ValueError: for an unsupported opset or inputs that do not match the graph's placeholders, or a graph
            with timestep groups exported without ``timestep_group`` (or one without groups exported with it), or a
            graph with a float tail exported without ``ignore_float_tail``.
    """
    tail = graph_info(model).float_tail if isinstance(model, fx.GraphModule) and has_graph_info(model) else None
    if tail is not None and not ignore_float_tail:
        raise ValueError(
            f"the graph has a float tail (timesteps <= {tail.below} run with float activations), which an ONNX file "
            "of the integer graph does not hold: pass ignore_float_tail=True and run those timesteps on "
            "fake_quant_view(model, float_activations=True), or quantize with float_tail=False"
        )
    converted = is_converted_graph(model)
    groups = graph_info(model).timestep_groups if isinstance(model, fx.GraphModule) and has_graph_info(model) else None
    has_groups = isinstance(groups, TimestepGroupGrids) and bool(groups.grids)
    if converted:  # a converted graph carries its groups as lowered entries (None where a group kept one grid)
        has_groups = isinstance(groups, TimestepGroupGrids) and groups.lowered is not None and any(groups.lowered)
    if isinstance(groups, TimestepGroupGrids) and has_groups and timestep_group is None:
        raise ValueError(
            f"the graph has {groups.num_groups} timestep groups with their own activation qparams (boundaries "
            f"{list(groups.boundaries)}), and an ONNX file holds one set: pass timestep_group=g and export one file "
            "per group, or quantize with timestep_groups=1"
        )
    if timestep_group is not None:
        if not has_groups:
            raise ValueError(f"timestep_group={timestep_group} was given, but the graph has no timestep groups; "
                             "drop the argument")
        model = converted_for_group(model, timestep_group) if converted else prepared_for_group(model,
                                                                                              timestep_group)[0]
    try:
        import onnx
    except ImportError as err:
        raise ImportError("export_onnx needs the onnx package: pip install 'qdiff_ao[onnx]'") from err
    if not _MIN_OPSET <= opset <= _MAX_OPSET:
        raise ValueError(f"opset must be in [{_MIN_OPSET}, {_MAX_OPSET}] (per-channel Q/DQ needs 13), got {opset}")
    if converted:
        gm = fake_quant_view(model)
        if quantize_bias:
            _round_biases(gm)
            gm.recompile()
        counts = {"activation_qdq": sum(isinstance(m, ActivationQDQ) for m in gm.modules()),
                  "weight_qdq": sum(isinstance(m, WeightQDQ) for m in gm.modules()),
                  "float_fake_quant": sum(isinstance(m, FixedFakeQuantize) for m in gm.modules())}
    else:
        gm, counts = to_fake_quant_graph(model, quantize_bias=quantize_bias)
    if signed_activations:
        _signed_activations(gm)
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    missing = [n for n in names if n not in example_inputs]
    extra = [k for k in example_inputs if k not in names]
    if missing or extra:
        raise ValueError(
            f"example_inputs must name the graph's inputs {names}; missing {missing}, unexpected {extra}. Pass the "
            "same dict used for qdiff_ao.prepare"
        )
    cast_integer_math_inputs(gm, example_inputs)
    args = tuple(example_inputs[n] for n in names)
    dynamic_axes = {n: {0: "batch"} for n in [*names, "output"]} if dynamic_batch else None
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings from input guards, legacy-exporter deprecation notice
        torch.onnx.export(gm.eval(), args, os.fspath(path), input_names=names, output_names=["output"],
                          opset_version=opset, dynamo=False, dynamic_axes=dynamic_axes, do_constant_folding=True)
    proto = onnx.load(os.fspath(path))
    n_bias = quantize_biases(proto) if quantize_bias else 0
    zero_points = [int(m.zero_point) for m in gm.modules() if isinstance(m, ActivationQDQ)]
    nonzero = sum(z != 0 for z in zero_points)
    if nonzero:
        logger.info("%d of %d activation quantizers have a nonzero zero point; TensorRT needs symmetric int8 "
                    "(QuantConfig(act_symmetric=True) and signed_activations=True)", nonzero, len(zero_points))
    layers = {str(n.target): gm.get_submodule(str(n.target)) for n in gm.graph.nodes if n.op == "call_module"}
    ranges = {name: m.quant_range for name, m in layers.items() if isinstance(m, WeightQDQ)}
    meta = {
        "qdiff_ao.format": "qdq",
        "qdiff_ao.weight_ranges": json.dumps({k: list(v) for k, v in ranges.items()}),
        "qdiff_ao.weight_code_ranges": json.dumps(sorted({tuple(v) for v in ranges.values()})),
    }
    cfg = graph_info(model).config if has_graph_info(model) else None
    if cfg is not None:
        meta["qdiff_ao.config"] = json.dumps(cfg.to_dict())
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, os.fspath(path))
    report = OnnxExportReport(os.fspath(path), counts["activation_qdq"], counts["weight_qdq"],
                              counts["float_fake_quant"], n_bias, nonzero, ranges)
    logger.info("exported %s: %d activation Q/DQ, %d weight Q/DQ, %d float fake-quant, %d int32 biases",
                report.path, report.activation_qdq, report.weight_qdq, report.float_fake_quant, n_bias)
    return report
