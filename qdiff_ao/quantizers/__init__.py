"""The quantizer vocabulary: every fake-quant, learned and clamped-code module, and the simulation built from them.

- ``fixed``: :class:`FixedFakeQuantize`, frozen qparams (16-bit softmax, per-channel activations).
- ``adaround``: :class:`AdaRoundWeight` (learned rounding) and :class:`LearnedStepQuant` (learned step size).
- ``reference``: clamped reference Conv2d/Linear, which keep 4-bit codes inside their range at convert time.
- ``qparams``: the one place that turns an observer (activation or weight) into qparams.
- ``simulation``: a fake-quant copy of a prepared graph, with a full-precision context manager.
"""

from __future__ import annotations

from qdiff_ao.quantizers.adaround import AdaRoundWeight, LearnedStepQuant
from qdiff_ao.quantizers.fixed import FixedFakeQuantize
from qdiff_ao.quantizers.qparams import QParams, activation_qparams, is_quantized_layer, weight_qparams
from qdiff_ao.quantizers.reference import ClampedReferenceConv2d, ClampedReferenceLinear
from qdiff_ao.quantizers.simulation import Simulation, build_simulation

__all__ = [
    "AdaRoundWeight",
    "ClampedReferenceConv2d",
    "ClampedReferenceLinear",
    "FixedFakeQuantize",
    "LearnedStepQuant",
    "QParams",
    "Simulation",
    "activation_qparams",
    "build_simulation",
    "is_quantized_layer",
    "weight_qparams",
]
