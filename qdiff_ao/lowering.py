"""One-call helpers around torch.ao's FX workflow: trace -> split -> prepare_fx -> calibrate -> convert_fx.

These are conveniences: a user's own ``prepare_fx`` / ``convert_fx`` calls with
``get_qconfig_mapping(cfg)`` / ``get_backend_config(cfg)`` work too (then call ``passes.observe_softmax``
after prepare_fx to quantize attention probabilities, and ``passes.freeze_wide_softmax_observers`` before
convert_fx for 16-bit ones).

Example:
    >>> import torch, qdiff_ao
    >>> from diffusers import UNet2DModel
    >>> unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
    ...                    norm_num_groups=4, layers_per_block=1,
    ...                    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    ...                    up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()
    >>> inputs = {"sample": torch.randn(2, 1, 8, 8), "timestep": torch.tensor([10, 10])}
    >>> cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)
    >>> prepared = qdiff_ao.prepare(unet, cfg, inputs)
    >>> _ = prepared(**inputs)                      # calibration (use qdiff_ao.calibrate with real data)
    >>> quantized = qdiff_ao.convert(prepared)
    >>> quantized(**inputs).shape
    torch.Size([2, 1, 8, 8])
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import fx, nn

from qdiff_ao._compat import convert_fx, prepare_fx
from qdiff_ao.config import QuantConfig
from qdiff_ao.passes.observe_softmax import freeze_wide_softmax_observers, observe_softmax
from qdiff_ao.passes.split_shortcut import split_shortcut
from qdiff_ao.qconfig import get_backend_config, get_qconfig_mapping
from qdiff_ao.tracing import trace

__all__ = ["prepare", "convert", "quantize_fx"]

logger = logging.getLogger(__name__)

_CONFIG_KEY = "qdiff_config"


def prepare(
    model: nn.Module,
    cfg: QuantConfig,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    split: bool = True,
) -> fx.GraphModule:
    """Trace (unless ``model`` already is a GraphModule), split skip concats, insert observers.

    Args:
        model: a diffusers UNet or a GraphModule from :func:`qdiff_ao.trace`.
        cfg: the quantization settings.
        example_inputs: UNet forward arguments by name (e.g. ``calib.example_inputs()``).
        split: apply split shortcut quantization (Q-Diffusion Sec. 4.2).

    Returns:
        The prepared GraphModule (observers inserted; calibrate it, then :func:`convert`).
    """
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"cfg must be a qdiff_ao.QuantConfig, got {type(cfg).__name__}")
    # Attention is decomposed into matmul/softmax/matmul only when it is quantized: the decomposed form
    # materialises the scores and is much slower than SDPA at larger batches.
    gm = model if isinstance(model, fx.GraphModule) else trace(
        model, dict(example_inputs), decompose_attention=cfg.quantize_attention and cfg.act_bits is not None
    )
    meta = dict(gm.meta)
    if split:
        gm = split_shortcut(gm)
        meta = dict(gm.meta)
    prepared = prepare_fx(
        gm, get_qconfig_mapping(cfg), tuple(example_inputs.values()), backend_config=get_backend_config(cfg)
    )
    prepared.meta.update(meta)
    prepared.meta[_CONFIG_KEY] = cfg
    observe_softmax(prepared, cfg)
    return prepared


def convert(prepared: fx.GraphModule, cfg: QuantConfig | None = None) -> fx.GraphModule:
    """Lower a calibrated prepared graph to fbgemm/x86 quantized kernels with ``convert_fx``.

    ``cfg`` defaults to the one :func:`prepare` stored on the graph.
    """
    cfg = cfg or prepared.meta.get(_CONFIG_KEY)
    if cfg is None:
        raise ValueError("convert needs the QuantConfig used at prepare time: pass cfg=")
    meta = dict(prepared.meta)
    freeze_wide_softmax_observers(prepared)
    quantized = convert_fx(prepared, backend_config=get_backend_config(cfg))
    quantized.meta.update(meta)
    return quantized


def quantize_fx(
    model: nn.Module,
    cfg: QuantConfig,
    calibration_batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    split: bool = True,
) -> fx.GraphModule:
    """prepare -> feed every batch -> convert, with plain (not timestep-grouped) calibration.

    For timestep-aware calibration use :func:`qdiff_ao.calibrate` with a ``CalibrationSet`` between
    :func:`prepare` and :func:`convert`.
    """
    batches = list(calibration_batches)
    if not batches:
        raise ValueError("quantize_fx needs at least one calibration batch (a dict of UNet inputs)")
    prepared = prepare(model, cfg, batches[0], split=split)
    with torch.no_grad():
        for batch in batches:
            prepared(**batch)
    return convert(prepared, cfg)
