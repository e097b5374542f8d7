"""Stage 4, deploy: the lowered UNet behind diffusers' call signature, frozen execution, checkpoints and ONNX.

- ``quantized_unet``: :class:`QuantizedUNet` (``save_pretrained`` / ``from_pretrained``).
- ``freezing``: TorchScript trace + freeze of a converted graph.
- ``layer_check``: each lowered kernel against torch.ao's reference module, in output steps.
- ``checkpoint/``: the compressed safetensors checkpoint format.
- ``onnx/``: QDQ ONNX export for ONNX Runtime / TensorRT.
"""

from __future__ import annotations

from qdiff_ao.deploy.freezing import freeze_graph
from qdiff_ao.deploy.quantized_unet import QuantizedUNet

__all__ = ["QuantizedUNet", "freeze_graph"]
