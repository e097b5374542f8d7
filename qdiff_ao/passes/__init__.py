"""FX graph passes over traced diffusion UNets.

- :func:`split_shortcut`: each half of a decoder skip concat gets its own quantizers (Q-Diffusion Sec. 4.2).
- :func:`observe_softmax` / :func:`freeze_wide_softmax_observers`: attention probabilities at 8/16 bits.
"""

from __future__ import annotations

from qdiff_ao.passes.observe_softmax import FixedFakeQuantize, freeze_wide_softmax_observers, observe_softmax
from qdiff_ao.passes.split_shortcut import SplitConv2d, SplitRecord, SplitShortcutPass, split_shortcut

__all__ = [
    "FixedFakeQuantize",
    "SplitConv2d",
    "SplitRecord",
    "SplitShortcutPass",
    "freeze_wide_softmax_observers",
    "observe_softmax",
    "split_shortcut",
]
