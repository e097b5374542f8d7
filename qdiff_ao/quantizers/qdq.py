"""Fake-quant modules in the form the ONNX exporter turns into QuantizeLinear / DequantizeLinear pairs.

``ActivationQDQ`` is one per-tensor activation quantizer, ``WeightQDQ`` a Conv2d / Linear whose weight passes
through a per-channel (or per-tensor) weight quantizer. Both compute
``fq(x) = (clamp(round(x / s) + z, lo, hi) - z) * s`` with ``torch.fake_quantize_*`` ops, which the TorchScript ONNX
exporter (opset >= 13) writes as Q/DQ pairs. ``deploy.onnx.export.to_fake_quant_graph`` builds them from a prepared
graph's observers, ``deploy.fake_quant_view`` from a converted graph's integer modules.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from qdiff_ao.observers.base import CONTAINER_RANGES
from qdiff_ao.quantizers.qparams import QParams

__all__ = ["ActivationQDQ", "WeightQDQ"]


class ActivationQDQ(nn.Module):
    """x -> fake_quantize_per_tensor_affine(clamp(x, lo, hi), s, z, container range); exports as [Clip] Q DQ.

    ``signed = True`` (set by ``passes.attention_operands.mark_signed_attention_operands`` on Q, K, V) writes a
    uint8 grid with zero point 128 in its INT8 form with zero point 0 -- the same numbers.

    ``lo = (quant_min - z) * s`` and ``hi = (quant_max - z) * s`` keep codes inside a range narrower than the
    container; the clamp is omitted when the range is the full container.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int, quant_max: int,
                 container: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().reshape(()).float().clone())
        self.register_buffer("zero_point", zero_point.detach().reshape(()).to(torch.int32).clone())
        self.container = container
        self.signed = False  # export a symmetric uint8 grid (zero point 128) in its INT8 form: see forward
        self.clip: tuple[float, float] | None = None
        if (quant_min, quant_max) != container:
            s, z = float(self.scale), int(self.zero_point)
            self.clip = ((quant_min - z) * s, (quant_max - z) * s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.clip is not None:
            x = torch.clamp(x, self.clip[0], self.clip[1])
        if self.signed and self.container == (0, 255) and int(self.zero_point) == 128:
            # a symmetric uint8 grid, written as the same numbers in INT8 with zero point 0:
            # (clamp(round(x/s) + 128, 0, 255) - 128) s == clamp(round(x/s), -128, 127) s. OpenVINO runs a matmul
            # of two activations in INT8 only with such operands; convs keep uint8 (ORT's integer conv wants it).
            return torch.fake_quantize_per_tensor_affine(x, self.scale, torch.zeros_like(self.zero_point), -128, 127)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, *self.container)


class WeightQDQ(nn.Module):
    """A Conv2d / Linear whose weight (already on the quantization grid) passes through a fake-quant op."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    scale: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, layer: nn.Conv2d | nn.Linear, qparams: QParams) -> None:
        super().__init__()
        scale, zero_point, qmin, qmax = qparams.scale, qparams.zero_point, qparams.quant_min, qparams.quant_max
        self.container = CONTAINER_RANGES[qparams.dtype]
        self.axis = qparams.ch_axis
        if self.axis not in (None, 0):
            raise ValueError(f"per-channel weight qparams must use ch_axis=0 (output channels), got {self.axis}")
        w = layer.weight.detach().float()
        # torch's own quantize ops give the integer codes convert_fx uses (same rounding at exact ties).
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
            if self.axis is None:
                qw = torch.quantize_per_tensor(w, float(scale), int(zero_point), qparams.dtype)
                s, z = scale.float().reshape(()), zero_point.float().reshape(())
            else:
                qw = torch.quantize_per_channel(w, scale.float(), zero_point.long(), 0, qparams.dtype)
                s = scale.float().reshape([-1] + [1] * (w.dim() - 1))
                z = zero_point.float().reshape(s.shape)
        codes = torch.clamp(qw.int_repr().float(), qmin, qmax)
        self.register_buffer("weight", (codes - z) * s)
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).clone())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.layer = layer
        self.quant_range = (qmin, qmax)

    def round_bias(self, input_scale: torch.Tensor) -> None:
        """bias <- round(b / (s_x * s_w)) * (s_x * s_w): the int32 bias grid of the ONNX graph (float32 math)."""
        if self.bias is None:
            return
        grid = input_scale.float().reshape(()) * self.scale.float().reshape(-1).expand_as(self.bias)
        codes = torch.round(self.bias.double() / grid.double()).clamp(-(2**31), 2**31 - 1)
        self.bias = codes.float() * grid

    def quantized_weight(self) -> torch.Tensor:
        lo, hi = self.container
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(self.weight, self.scale, self.zero_point, lo, hi)
        return torch.fake_quantize_per_channel_affine(self.weight, self.scale, self.zero_point, self.axis, lo, hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.quantized_weight()
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(x, w, self.bias)
        return F.linear(x, w, self.bias)

