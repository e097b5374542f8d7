"""FX graph passes over traced diffusion UNets. Each takes the graph, changes it in place and returns it; what it
found or learned goes into ``qdiff_ao.graph_info(gm)`` (splits, softmax_observers, reconstruction,
bias_correction).

- :func:`split_shortcut`: each half of a decoder skip concat gets its own quantizers (Q-Diffusion Sec. 4.2).
- :func:`observe_softmax` / :func:`freeze_wide_softmax_observers`: attention probabilities at 8/16 bits.
- :func:`symmetric_attention_operands`: symmetric Q, K, V quantizers (no zero-point terms in attention matmuls).
- :func:`choose_attention_grids`: after calibration, symmetric Q, K, V grids where they cost at most half a bit.
- :func:`reconstruct`: BRECQ block reconstruction with AdaRound weights and learned activation step sizes.
- :func:`reconstruct_and_choose`: learn the final decoder stage twice, keep the run sampling nearer the float one.
- :func:`choose_float_layers`: find, by measurement, the few layers whose quantizers the model cannot afford.
- :func:`choose_float_tail`: the last timesteps run with float activations, where measurement says they need it.
- :func:`choose_timestep_groups`: activation grids per group of timesteps, where held-back rows say they help.
- :func:`correct_output`: subtract the output's mean quantization error per timestep group, where it helps.
- :func:`match_prediction_spread`: keep the quantized sampler's denoised-estimate spread equal to the float one's.
- :func:`correct_output_bias`: fold the mean quantization error of the model output into the output layer's bias.
"""

from __future__ import annotations

from qdiff_ao.passes.attention_operands import AttentionGridChoice, choose_attention_grids, symmetric_attention_operands
from qdiff_ao.passes.bias_correction import correct_output_bias, find_output_layer
from qdiff_ao.passes.float_tail_choice import choose_float_tail
from qdiff_ao.passes.output_correction import TimestepOutputCorrection, add_output_correction, correct_output
from qdiff_ao.passes.precision_fallback import FallbackDecision, choose_float_layers
from qdiff_ao.passes.prediction_spread import match_prediction_spread
from qdiff_ao.passes.reconstruction import module_types_of, reconstruct
from qdiff_ao.passes.reconstruction_choice import reconstruct_and_choose, sample_distance, sample_score
from qdiff_ao.passes.shortcut_split import SplitConv2d, SplitRecord, SplitShortcutPass, split_shortcut
from qdiff_ao.passes.softmax_observation import freeze_wide_softmax_observers, is_softmax_observer, observe_softmax
from qdiff_ao.passes.timestep_groups import choose_timestep_groups
from qdiff_ao.quantizers.fixed import FixedFakeQuantize

__all__ = [
    "AttentionGridChoice",
    "FallbackDecision",
    "FixedFakeQuantize",
    "SplitConv2d",
    "SplitRecord",
    "SplitShortcutPass",
    "TimestepOutputCorrection",
    "add_output_correction",
    "choose_attention_grids",
    "choose_float_layers",
    "choose_float_tail",
    "choose_timestep_groups",
    "correct_output",
    "correct_output_bias",
    "find_output_layer",
    "freeze_wide_softmax_observers",
    "is_softmax_observer",
    "match_prediction_spread",
    "module_types_of",
    "observe_softmax",
    "reconstruct",
    "reconstruct_and_choose",
    "sample_distance",
    "sample_score",
    "split_shortcut",
    "symmetric_attention_operands",
]
