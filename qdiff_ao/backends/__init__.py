"""Backends: one object per target that bundles its QConfigMapping, BackendConfig and lowering steps.

Pass one to ``qdiff_ao.prepare(model, cfg, inputs, backend=...)``; ``qdiff_ao.convert`` uses the same one.

- :class:`X86Backend` (default): fbgemm/x86 INT8 kernels on the CPU.
- :class:`CudnnBackend`: torch's cuDNN INT8 kernels, for the layers that qualify (``cudnn_rules``).
- :class:`Backend`: the base class of a new target.
"""

from __future__ import annotations

from qdiff_ao.backends.base import Backend
from qdiff_ao.backends.cudnn import CudnnBackend
from qdiff_ao.backends.cudnn_rules import LayerDecision, plan_cudnn_lowering
from qdiff_ao.backends.x86 import X86Backend

__all__ = ["Backend", "CudnnBackend", "LayerDecision", "X86Backend", "plan_cudnn_lowering"]
