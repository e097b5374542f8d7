"""Stage 1, capture: a diffusers UNet becomes one flat ``torch.fx.GraphModule`` carrying a :class:`QDiffGraphInfo`.

- :func:`trace`: concrete-value tracing with input guards (``tracing``, ``_concrete_tracer``).
- :mod:`~qdiff_ao.capture.graph_state`: the typed state every later stage reads and extends.
- :mod:`~qdiff_ao.capture.input_guards`: the guard function at each graph input and how to find it.
- :mod:`~qdiff_ao.capture.devices`: where a model lives; moving inputs there and a graph with its device constants.
"""

from __future__ import annotations

from qdiff_ao.capture.graph_state import (
    QDiffGraphInfo,
    TraceInfo,
    convert_custom_config,
    graph_info,
    prepare_custom_config,
)
from qdiff_ao.capture.tracing import trace

__all__ = ["QDiffGraphInfo", "TraceInfo", "convert_custom_config", "graph_info", "prepare_custom_config", "trace"]
