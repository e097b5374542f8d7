"""Output bias correction: remove the mean quantization error of the UNet's noise prediction.

Quantization errors are not zero-mean: 4-bit weight rounding (even AdaRound's, which minimises a block's
Lp error, not its mean) and asymmetric activation grids leave a small *systematic* offset in the predicted
noise. On the bundled digits DDPM at W4A8 it is a near-constant ``E[eps_q - eps_fp] ≈ +-0.02..0.05`` at every
DDIM step; a sampler adds it up over all steps, so the images drift in brightness and the digits FD doubles
although the per-step relative error is only ~0.1. PTQD (He et al., NeurIPS 2023) corrects this mean
("bias correction" of the quantization noise); Nagel et al. (ICCV 2019) fold the same correction into a
layer's bias. This pass does the latter for the layer that produces the model output:

    e_c  = mean over calibration rows n and positions (h, w) of  [ y_q(n, c, h, w) - y_fp(n, c, h, w) ]
    b_c <- b_c - e_c

where ``y`` is the output layer's output (after its output quantizer, when it has one), ``y_q`` comes from the
fake-quant simulation of the prepared graph (the numbers ``convert`` reproduces) and ``y_fp`` from the float
model on the same calibration inputs (drawn uniformly over the sampler's trajectory, so ``e`` is the
trajectory-averaged offset). The prepared graph keeps its structure; only the bias changes, so ``convert_fx``
and checkpoints carry the correction with no extra op.

    prepared ──calibrate──► (reconstruct) ──correct_output_bias──► conv_out.bias -= e ──convert──► int8 model
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from qdiff_ao._compat import ObserverBase
from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.capture.devices import module_device, to_device
from qdiff_ao.capture.graph_state import update_graph_info
from qdiff_ao.quantizers.fixed import FixedFakeQuantize
from qdiff_ao.quantizers.qparams import is_quantized_layer
from qdiff_ao.quantizers.simulation import build_simulation

__all__ = ["correct_output_bias", "find_output_layer"]

logger = logging.getLogger(__name__)

_MAX_HOPS = 16


def _is_quantizer(gm: fx.GraphModule, node: fx.Node) -> bool:
    return node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), (ObserverBase,
                                                                                          FixedFakeQuantize))


def find_output_layer(prepared: fx.GraphModule) -> tuple[str, str | None]:
    """(output layer, its output quantizer or None): the quantized conv/linear that produces the model output.

    Walks back from the graph output through activation quantizers and the first tensor argument of other
    ops (e.g. the ``sample / timesteps`` rescale of Fourier-embedding UNets).

    Raises:
        ValueError: if the output does not come from exactly one quantized Conv2d/Linear that way.
    """
    outputs = [n for n in prepared.graph.nodes if n.op == "output"]
    if len(outputs) != 1:
        raise ValueError(f"expected a graph with one output node, got {len(outputs)}")
    node: Any = outputs[0].args[0]
    quantizer = None
    for _ in range(_MAX_HOPS):
        while isinstance(node, (tuple, list)) and node:
            node = node[0]
        if isinstance(node, dict) and node:
            node = next(iter(node.values()))
        if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr"):
            break
        if node.op == "call_module" and is_quantized_layer(prepared.get_submodule(str(node.target))):
            return str(node.target), quantizer
        if node.op == "call_module" and isinstance(prepared.get_submodule(str(node.target)), (nn.Conv2d, nn.Linear)):
            raise ValueError(
                f"the model output comes from {node.target!r}, a layer kept in float: there is no quantized output "
                "layer whose bias could absorb the error (qdiff_ao.passes.correct_output corrects at the output)"
            )
        if _is_quantizer(prepared, node):
            quantizer = quantizer or str(node.target)
        node = node.args[0] if node.args else None
    raise ValueError(
        "correct_output_bias found no quantized Conv2d/Linear producing the model output (walking back from the "
        "output through quantizers and first arguments); name the layer explicitly with layer='conv_out'"
    )


def _output_quantizer(prepared: fx.GraphModule, layer: str) -> str | None:
    """The activation quantizer that is the only consumer of ``layer``'s output, if any."""
    for node in prepared.graph.nodes:
        if node.op == "call_module" and str(node.target) == layer and len(node.users) == 1:
            (user,) = node.users
            return str(user.target) if _is_quantizer(prepared, user) else None
    return None


def _channel_mean(diff: torch.Tensor, module: nn.Module) -> tuple[torch.Tensor, int]:
    """Sum over every dim but the channel dim (1 for conv, last for linear) and the count summed per channel."""
    if isinstance(module, nn.Conv2d):
        dims = [d for d in range(diff.dim()) if d != 1]
    else:
        dims = list(range(diff.dim() - 1))
    count = diff.numel() // diff.shape[1 if isinstance(module, nn.Conv2d) else -1]
    return diff.double().sum(dim=dims), count


def _capture(store: list[torch.Tensor]) -> Callable[..., None]:
    def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
        store.append(out.detach())

    return hook


@torch.no_grad()
def correct_output_bias(
    prepared: fx.GraphModule,
    calib: CalibrationSet,
    model: nn.Module,
    *,
    layer: str | None = None,
    batch_size: int = 32,
) -> fx.GraphModule:
    """Fold the mean output error of the quantized model into the output layer's bias (in place).

    ``b_c <- b_c - mean_{n,h,w}(y_q - y_fp)_c`` over every row of ``calib`` (see the module docstring). Run it
    after ``calibrate`` and ``reconstruct``, before ``convert``; running it again re-measures and corrects what
    is left (≈ 0).

    Args:
        prepared: the calibrated (and possibly reconstructed) output of ``qdiff_ao.prepare``.
        calib: calibration set whose rows are fed to both models (its inputs must match the graph's).
        model: the float diffusers UNet the graph was traced from (unchanged).
        layer: the output layer's module name; default: found by :func:`find_output_layer`. Its output is
            measured after its output quantizer when that is its only consumer.
        batch_size: rows per forward.

    Returns:
        ``prepared``, with the report ``{"layer", "quantizer", "correction" (per-channel e, list),
        "mean_abs_error_before", "num_samples"}`` in ``graph_info(prepared).bias_correction``.

    Raises:
        TypeError: for arguments of the wrong type.
        ValueError: if the output layer cannot be found or is missing from ``model``, an observer saw no data,
            or ``batch_size < 1``.
    """
    if not isinstance(prepared, fx.GraphModule):
        raise TypeError(f"prepared must be the GraphModule returned by qdiff_ao.prepare, got {type(prepared).__name__}")
    if not isinstance(calib, CalibrationSet):
        raise TypeError(f"calib must be a qdiff_ao.CalibrationSet, got {type(calib).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the float diffusers UNet (an nn.Module), got {type(model).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if layer is None:
        layer, quantizer = find_output_layer(prepared)
    else:
        quantizer = _output_quantizer(prepared, layer)
    target = prepared.get_submodule(layer)
    if not is_quantized_layer(target):
        raise ValueError(f"layer {layer!r} is not a quantized Conv2d/Linear of the prepared graph")
    try:
        fp_layer = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(
            f"model has no module {layer!r}: pass the float UNet that was traced into this prepared graph"
        ) from None
    sim = build_simulation(prepared)
    sim.gm.eval()
    q_out: list[torch.Tensor] = []
    fp_out: list[torch.Tensor] = []
    q_handle = sim.gm.get_submodule(quantizer or layer).register_forward_hook(_capture(q_out))
    fp_handle = fp_layer.register_forward_hook(_capture(fp_out))
    total, count, abs_total = None, 0, 0.0
    try:
        for _, inputs in calib.batches(batch_size):
            # sim.gm, not sim.run: with timestep groups run() splits a batch into one call per group, and the
            # hook below would capture only the last part (this static correction measures the single grids)
            sim.gm(**to_device({str(n.target): inputs[str(n.target)] for n in sim.gm.graph.nodes
                                if n.op == "placeholder"}, module_device(sim.gm)))
            model(**to_device(inputs, module_device(model)))
            diff = q_out.pop() - fp_out.pop()
            q_out.clear()
            fp_out.clear()
            s, c = _channel_mean(diff, target)
            total = s if total is None else total + s
            count += c
            abs_total += float(diff.abs().double().sum())
    finally:
        q_handle.remove()
        fp_handle.remove()
    if total is None:
        raise ValueError("the calibration set is empty")
    error = (total / count).to(target.weight.dtype)
    if target.bias is None:
        target.bias = nn.Parameter(torch.zeros(target.weight.shape[0], dtype=target.weight.dtype,
                                               device=target.weight.device), requires_grad=False)
    target.bias.sub_(error.to(target.bias.device))
    report = {"layer": layer, "quantizer": quantizer, "correction": error.tolist(),
              "mean_abs_error_before": abs_total / (count * error.numel()), "num_samples": len(calib)}
    update_graph_info(prepared, bias_correction=report)
    logger.info("bias correction of %s: mean error %s removed", layer, [round(v, 5) for v in error.tolist()])
    return prepared
