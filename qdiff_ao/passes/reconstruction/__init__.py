"""BRECQ block reconstruction with AdaRound weights and learned activation step sizes (Q-Diffusion Sec. 4.3).

- ``runner``: :func:`reconstruct`, the pass itself (plan, per-block optimisation, bake).
- ``blocks``: partition of the graph into blocks by the original module hierarchy.
- ``cache``: the full-precision and quantized frontiers of cached block inputs/outputs.
- ``training``: the optimisation of one block (rounding, then step sizes).
- ``resume_state``: the safetensors file that makes a run resumable.
"""

from __future__ import annotations

from qdiff_ao.passes.reconstruction.runner import cache_bytes_per_row, module_types_of, reconstruct

__all__ = ["cache_bytes_per_row", "module_types_of", "reconstruct"]
