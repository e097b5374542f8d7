"""FX graph passes over traced diffusion UNets.

- :func:`split_shortcut`: each half of a decoder skip concat gets its own quantizers (Q-Diffusion Sec. 4.2).
- :func:`observe_softmax` / :func:`freeze_wide_softmax_observers`: attention probabilities at 8/16 bits.
- :func:`reconstruct`: BRECQ block reconstruction with AdaRound weights and learned activation step sizes.
- :func:`correct_output_bias`: fold the mean quantization error of the model output into the output layer's bias.
"""

from __future__ import annotations

from qdiff_ao.passes.bias_correction import correct_output_bias, find_output_layer
from qdiff_ao.passes.observe_softmax import FixedFakeQuantize, freeze_wide_softmax_observers, observe_softmax
from qdiff_ao.passes.reconstruct import MODULE_TYPES_KEY, module_types_of, reconstruct
from qdiff_ao.passes.split_shortcut import SplitConv2d, SplitRecord, SplitShortcutPass, split_shortcut

__all__ = [
    "FixedFakeQuantize",
    "MODULE_TYPES_KEY",
    "SplitConv2d",
    "SplitRecord",
    "SplitShortcutPass",
    "correct_output_bias",
    "find_output_layer",
    "freeze_wide_softmax_observers",
    "module_types_of",
    "observe_softmax",
    "reconstruct",
    "split_shortcut",
]
