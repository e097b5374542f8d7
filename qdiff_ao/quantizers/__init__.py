"""The quantizer vocabulary: every fake-quant, learned and clamped-code module, and the simulation built from them.

- ``fixed``: :class:`FixedFakeQuantize`, frozen qparams (16-bit softmax, per-channel activations).
- ``adaround``: :class:`AdaRoundWeight` (learned rounding) and :class:`LearnedStepQuant` (learned step size).
- ``reference``: clamped reference Conv2d/Linear, which keep 4-bit codes inside their range at convert time.
- ``qparams``: the one place that turns an observer (activation or weight) into qparams.
- ``simulation``: a fake-quant copy of a prepared graph, with a full-precision context manager.
"""
