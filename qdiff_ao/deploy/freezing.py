"""Run a lowered UNet without Python in the loop: TorchScript trace + freeze of the converted GraphModule.

A converted UNet is a GraphModule of several hundred nodes; executing it from Python costs a dispatch per node
(module ``__call__``, argument handling), which at batch 1 or for small models outweighs the INT8 kernels
themselves (bundled digits DDPM at batch 1: 6.8 ms for the GraphModule vs 2.5 ms frozen, one thread). The
frozen module runs the very same ``quantized::*`` kernels with the same packed weights, so its outputs are
bit-identical; only the interpreter is gone:

    converted GraphModule ──torch.jit.trace──► TorchScript graph ──torch.jit.freeze──► constants inlined,
                                                                                    attribute lookups gone

What tracing freezes: Python-level control flow and the input guards of :func:`qdiff_ao.trace` run once, at
trace time. :class:`~qdiff_ao.QuantizedUNet` therefore checks every input against the traced signature in
Python before calling the frozen module; a batch size other than the example's is fine (every shape
computation of the graph is traced as a tensor op).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

__all__ = ["freeze_graph"]

logger = logging.getLogger(__name__)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return _first_tensor(out[0])
    return out.sample if hasattr(out, "sample") else out


@torch.no_grad()
def freeze_graph(gm: fx.GraphModule, example_inputs: Mapping[str, torch.Tensor]) -> torch.jit.ScriptModule:
    """TorchScript-trace and freeze a converted UNet graph; checks the result is bit-identical on the example.

    Args:
        gm: a converted (``qdiff_ao.convert`` / ``convert_fx``) GraphModule in eval mode.
        example_inputs: one batch of graph inputs by name (any batch size).

    Returns:
        The frozen ScriptModule, called with the same keyword inputs as ``gm``.

    Raises:
        TypeError: if ``gm`` is not a GraphModule.
        RuntimeError: if the frozen module's output differs from ``gm``'s on the example (a graph whose
            control flow depends on input values; keep using the GraphModule then).
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"freeze_graph needs the converted fx.GraphModule, got {type(gm).__name__}")
    gm.eval()
    inputs = dict(example_inputs)
    with warnings.catch_warnings():
        # The trace warns about Python values (shapes, guard results) it records as constants: expected here,
        # and the equality check below is what guards the result.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch 2.14 marks torch.jit deprecated in favour of torch.compile, which has no path for torch.ao's
        # quantized::* ops on CPU; silence that notice for this call only.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated", category=FutureWarning)
        traced = torch.jit.trace(gm, example_kwarg_inputs=inputs, strict=False, check_trace=False)
        frozen = torch.jit.freeze(traced.eval())
    expected, got = _first_tensor(gm(**inputs)), _first_tensor(frozen(**inputs))
    if not torch.equal(expected, got):
        diff = (expected - got).abs().max().item()
        raise RuntimeError(
            f"the frozen TorchScript module differs from the GraphModule on the example inputs (max |diff| "
            f"{diff:.3g}); the graph has value-dependent control flow. Run the GraphModule instead"
        )
    logger.info("froze %s into TorchScript (%d graph nodes)", type(gm).__name__, len(gm.graph.nodes))
    return frozen
