"""Per-layer check of a lowering: each quantized kernel against torch.ao's reference module, on its real input.

A whole-model comparison says *that* a lowering is off; this says *which* layer. Every quantized conv / linear of
the lowered graph (a torch.ao quantized module: packed weight, output ``scale`` / ``zero_point``) is run on the
quantized tensor it received in one forward of the lowered graph, and compared with the same-named module of
``convert_to_reference_fx`` of the same calibrated graph, fed the same values:

    y_kernel = dequantize(layer(x_q))
    y_ref    = dequantize(quantize(reference(dequantize(x_q)), layer.scale, layer.zero_point))
    lsb      = max |y_kernel - y_ref| / layer.scale          (output steps; a correct kernel: <= 1)
    rel_l2   = |y_kernel - y_ref| / |y_ref|

Its first version found that torch's cuDNN ``quantized::linear`` drops its bias (H200, torch 2.11: every conv
within 0.3% relative L2, every biased linear 12-18% off; see ``qdiff_ao.backends.cudnn_rules``).

Example:
    >>> import copy, torch, qdiff_ao
    >>> from qdiff_ao._compat import convert_to_reference_fx
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 1)).eval()
    >>> x = {"input": torch.randn(2, 3, 8, 8)}
    >>> prepared = qdiff_ao.prepare(net, qdiff_ao.QuantConfig(weight_bits=8, act_bits=8), x, split=False)
    >>> _ = prepared(**x)
    >>> reference = convert_to_reference_fx(copy.deepcopy(prepared), backend_config=qdiff_ao.get_backend_config(
    ...     qdiff_ao.QuantConfig(weight_bits=8, act_bits=8)))
    >>> checks = check_lowered_layers(qdiff_ao.convert(prepared), reference, x)
    >>> [(c.name, c.lsb <= 1.0) for c in checks]
    [('0', True), ('2', True)]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from qdiff_ao.capture.devices import module_device, to_device

__all__ = ["LayerCheck", "check_lowered_layers"]


@dataclass(frozen=True)
class LayerCheck:
    """One lowered layer against its reference module (module docstring for the formulas).

    Attributes:
        name: module path, the same in both graphs.
        kind: the lowered module's class name.
        lsb: the largest difference in output steps of the layer's output grid.
        rel_l2: relative L2 difference to the reference.
    """

    name: str
    kind: str
    lsb: float
    rel_l2: float


def _is_lowered_layer(module: nn.Module) -> bool:
    """A torch.ao quantized conv / linear: its ``weight`` is a method returning the packed quantized weight, and it
    carries the output grid (``scale``, ``zero_point``)."""
    weight = getattr(module, "weight", None)
    return (callable(weight) and not isinstance(weight, torch.Tensor) and hasattr(module, "scale")
            and hasattr(module, "zero_point"))


def check_lowered_layers(lowered: fx.GraphModule, reference: fx.GraphModule,
                         inputs: Mapping[str, torch.Tensor]) -> list[LayerCheck]:
    """Compare every quantized conv / linear of ``lowered`` with the same-named module of ``reference``.

    Args:
        lowered: the converted graph (``qdiff_ao.convert`` or ``convert_fx``), on the device its kernels run on.
        reference: ``convert_to_reference_fx`` of the same calibrated prepared graph (same module names).
        inputs: graph inputs by name for one forward of ``lowered`` (moved to its device), which records each
            layer's quantized input.

    Returns:
        One :class:`LayerCheck` per lowered layer that has a reference module, worst (largest ``lsb``) first.

    Raises:
        ValueError: ``lowered`` has no quantized conv / linear, or none of them is in ``reference``.
    """
    layers = {name: m for name, m in lowered.named_modules() if _is_lowered_layer(m)}
    references = dict(reference.named_modules())
    shared = {name: m for name, m in layers.items() if name in references}
    if not shared:
        raise ValueError(f"no quantized conv / linear of the lowered graph has a reference module of the same name "
                         f"({len(layers)} lowered layers); pass convert_to_reference_fx of the same prepared graph")
    seen: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(name, args[0])  # the first call: a layer called twice is checked on its first input
        return hook

    handles = [m.register_forward_pre_hook(record(name)) for name, m in shared.items()]
    try:
        with torch.no_grad():
            lowered(**to_device(inputs, module_device(lowered)))
    finally:
        for h in handles:
            h.remove()
    checks = []
    with torch.no_grad():
        for name, x_q in seen.items():
            layer = shared[name]
            out_q = layer(x_q)
            ref = references[name](x_q.dequantize().to(next(references[name].parameters()).device))
            ref_q = torch.quantize_per_tensor(ref.to(out_q.device), float(layer.scale), int(layer.zero_point),
                                              out_q.dtype)
            y, y_ref = out_q.dequantize(), ref_q.dequantize()
            diff = (y - y_ref).abs()
            checks.append(LayerCheck(name, type(layer).__name__, float(diff.max()) / float(layer.scale),
                                     float(diff.norm() / y_ref.norm().clamp_min(1e-12))))
    return sorted(checks, key=lambda c: -c.lsb)
