"""Compressed checkpoints of quantized UNets: real integer weights (4-bit codes packed two per byte) + qparams.

    quantized = qdiff_ao.convert(prepared)                        # or a QuantizedUNet
    qdiff_ao.checkpoint.save(QuantizedUNet(quantized, like=unet), "unet-w4a8")
    pipe.unet = qdiff_ao.checkpoint.load("unet-w4a8")             # bit-identical outputs, no FP weights needed

A checkpoint is a directory with ``model.safetensors`` (tensors, see ``_checkpoint_format``) and ``config.json``
(format version, the diffusers UNet class and config, the QuantConfig, the trace signature, the split shortcut
records, a fingerprint of the lowered graph, library versions and SHA-256 checks; see ``_checkpoint_io``). No
pickle is involved.

:func:`load` rebuilds the lowered graph from the config alone: it instantiates the UNet class from its config
(random weights), traces it on inputs of the recorded shapes, splits, prepares with the recorded QuantConfig
(min/max observers: the qparams they find are overwritten), runs one batch, converts, checks that the graph has
the saved fingerprint, then overwrites every integer weight, bias, qparam and float tensor from the file.

What a loaded model does not do: train (``QuantizedUNet.train(True)`` raises), change dtype (the integer
kernels take float32 activations; ``.half()`` / ``.to(torch.float16)`` are not supported), run on CUDA (the
fbgemm kernels are CPU only), or accept inputs whose non-batch shape or dtype differ from the traced ones.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from qdiff_ao._checkpoint_format import (
    CheckpointError,
    check_tensors,
    export_tensors,
    graph_fingerprint,
    import_tensors,
)
from qdiff_ao._checkpoint_io import FORMAT, FORMAT_VERSION, TENSORS_FILE, read_checkpoint, write_checkpoint
from qdiff_ao.config import QuantConfig
from qdiff_ao.lowering import convert, prepare
from qdiff_ao.tracing import trace
from qdiff_ao.unet import QuantizedUNet

if TYPE_CHECKING:
    from diffusers import ModelMixin  # at runtime diffusers is imported inside the functions that use it

__all__ = ["CheckpointError", "FORMAT_VERSION", "load", "save"]

logger = logging.getLogger(__name__)

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                                                        torch.int64, torch.int32)}


def _library_versions() -> dict[str, str]:
    import diffusers

    import qdiff_ao

    return {"qdiff_ao": qdiff_ao.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _jsonable(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{where} is {value}, which JSON cannot store")
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in value.items()}
    raise ValueError(f"{where} is a {type(value).__name__} ({value!r}), which a JSON config cannot store")


def _trace_record(info: Mapping[str, Any]) -> dict[str, Any]:
    inputs = {}
    for name, (ndim, dtype, tail) in info["inputs"].items():
        key = str(dtype).removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"input {name!r} was traced as {dtype}; checkpoints support {sorted(_DTYPES)}")
        inputs[name] = {"ndim": int(ndim), "dtype": key, "shape": [int(s) for s in tail]}
    return {
        "input_names": list(info["input_names"]),
        "inputs": inputs,
        "example_batch_size": info.get("example_batch_size") or 1,
        "decompose_attention": bool(info.get("decompose_attention", True)),
        "frozen_kwargs": {k: repr(v) for k, v in info.get("frozen_kwargs", {}).items()},
    }


def save(
    model: QuantizedUNet | fx.GraphModule,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    unet_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a quantized UNet as a compressed checkpoint directory.

    Weight codes ``q = clamp(round(w / scale) + zero_point, quant_min, quant_max)`` are stored as int8, or two
    per byte when the QuantConfig's weight range fits 4 bits; scales, zero points, biases, activation qparams
    and the remaining float tensors (norms, embeddings) are stored exactly.

    Args:
        model: a ``QuantizedUNet`` or a GraphModule from ``qdiff_ao.convert`` (its ``meta`` holds the trace
            info and QuantConfig).
        path: the checkpoint directory; created (with parents). Written atomically.
        overwrite: replace an existing qdiff_ao checkpoint at ``path``. Other directories are never replaced.
        unet_config: the diffusers UNet config; defaults to ``model.config`` (needed for a bare GraphModule).

    Returns:
        The absolute path of the checkpoint.

    Raises:
        TypeError: ``model`` is neither a QuantizedUNet nor a GraphModule.
        ValueError: the graph was not made by qdiff_ao.prepare/convert, is not converted, or the config is
            not JSON-serialisable.
        FileExistsError: ``path`` exists and may not be replaced.
    """
    if isinstance(model, QuantizedUNet):
        gm, unet_config = model.graph_module, unet_config if unet_config is not None else model.config
    elif isinstance(model, fx.GraphModule):
        gm = model
    else:
        raise TypeError(f"save takes a QuantizedUNet or a converted fx.GraphModule, got {type(model).__name__}")
    if unet_config is None:
        raise ValueError("save needs the diffusers UNet config for a bare GraphModule: pass unet_config=unet.config")
    info, cfg = gm.meta.get("qdiff_trace"), gm.meta.get("qdiff_config")
    if not isinstance(info, Mapping) or not isinstance(cfg, QuantConfig):
        raise ValueError(
            "the graph lacks meta['qdiff_trace'] / meta['qdiff_config']: build it with qdiff_ao.trace, "
            "qdiff_ao.prepare and qdiff_ao.convert (or quantize_fx) so that load() can rebuild it"
        )
    tensors, _ = export_tensors(gm, cfg.weight_qrange())
    config = _jsonable(dict(unet_config), "unet_config")
    if isinstance(config.get("_use_default_values"), list):  # diffusers builds it from a set: its order varies
        config["_use_default_values"] = sorted(config["_use_default_values"])
    body = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library": _library_versions(),
        "unet_class": str(info.get("model_class") or config.get("_class_name")),
        "unet_config": config,
        "quant_config": _jsonable(cfg.to_dict(), "quant_config"),
        "trace": _trace_record(info),
        "split_shortcut": "qdiff_splits" in gm.meta,
        "splits": _jsonable(gm.meta.get("qdiff_splits", []), "splits"),
        "graph_sha256": graph_fingerprint(gm),
        "num_tensors": len(tensors),
    }
    return write_checkpoint(path, body, tensors, overwrite=overwrite)


def _field(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = body.get(key)
    if not isinstance(value, kind):
        raise CheckpointError(f"{where}: field {key!r} is missing or not a {getattr(kind, '__name__', kind)}")
    return value


def _quant_config(data: Mapping[str, Any], where: str) -> tuple[QuantConfig, QuantConfig]:
    """(the saved QuantConfig, the one used to rebuild the graph: same lowering, fast min/max observers)."""
    data = dict(data)
    custom = {k: data.pop(k) for k in ("weight_observer", "act_observer") if data.get(k) is not None}
    try:
        skeleton = QuantConfig.from_dict(data)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: invalid quant_config ({err})") from None
    skeleton = dataclasses.replace(skeleton, range_method="minmax", running_stat=False, timestep_aware=False)
    try:
        saved = QuantConfig.from_dict({**data, **custom})
    except ValueError as err:
        logger.warning("%s: %s; the model loads, but its meta['qdiff_config'] lacks the custom observers", where, err)
        saved = QuantConfig.from_dict(data)
    return saved, skeleton


def _unet_class(name: str, where: str) -> type[ModelMixin]:
    import diffusers

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.ModelMixin)):
        raise CheckpointError(f"{where}: unet_class {name!r} is not a diffusers model class")
    return cls


def _example_inputs(record: Mapping[str, Any], where: str) -> dict[str, torch.Tensor]:
    batch = record.get("example_batch_size")
    inputs_spec = record.get("inputs")
    names = record.get("input_names")
    if not isinstance(batch, int) or batch < 1 or not isinstance(inputs_spec, dict) or not isinstance(names, list):
        raise CheckpointError(f"{where}: malformed trace record")
    inputs = {}
    for name in names:
        spec = inputs_spec.get(name)
        if not isinstance(spec, dict) or spec.get("dtype") not in _DTYPES or not isinstance(spec.get("shape"), list):
            raise CheckpointError(f"{where}: malformed trace record for input {name!r}")
        dtype, ndim = _DTYPES[spec["dtype"]], spec.get("ndim")
        shape = (batch, *spec["shape"]) if ndim else ()
        if ndim not in (0, len(shape)) or not all(isinstance(s, int) and s > 0 for s in shape):
            raise CheckpointError(f"{where}: input {name!r} has an invalid recorded shape {spec}")
        # Seeded data: the observers it feeds only decide qparams that the file overwrites.
        inputs[name] = torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)
    return inputs


def _rebuild(body: Mapping[str, Any], where: str) -> tuple[nn.Module, fx.GraphModule, QuantConfig]:
    """The UNet (random weights) and its lowered graph, rebuilt from the config alone."""
    cls = _unet_class(_field(body, "unet_class", str, where), where)
    unet_config = _field(body, "unet_config", dict, where)
    saved_cfg, skeleton_cfg = _quant_config(_field(body, "quant_config", dict, where), where)
    record = _field(body, "trace", dict, where)
    split = _field(body, "split_shortcut", bool, where)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            unet = cls.from_config(dict(unet_config)).eval()
            inputs = _example_inputs(record, where)
            gm = trace(unet, inputs, decompose_attention=bool(record.get("decompose_attention", True)), copy=False)
            prepared = prepare(gm, skeleton_cfg, inputs, split=split)
            with torch.no_grad():
                prepared(**inputs)
            quantized = convert(prepared, skeleton_cfg)
        except CheckpointError:
            raise
        except Exception as err:  # diffusers / tracing errors on a config that does not describe this model
            raise CheckpointError(
                f"{where}: cannot rebuild {cls.__name__} from the recorded config and inputs "
                f"({type(err).__name__}: {err})"
            ) from err
    quantized.meta["qdiff_config"] = saved_cfg
    return unet, quantized, saved_cfg


def load(path: str | os.PathLike[str]) -> QuantizedUNet:
    """Load a checkpoint written by :func:`save` into a ``QuantizedUNet`` whose outputs equal the saved model's.

    Args:
        path: the checkpoint directory.

    Returns:
        A ``QuantizedUNet`` in eval mode on the CPU, usable as ``pipe.unet``.

    Raises:
        CheckpointError: (a ``ValueError``) the directory is not a qdiff_ao checkpoint, has another format
            version, a file is truncated or corrupted, the config describes another model than the tensors,
            or a tensor has the wrong shape or dtype, non-finite or non-positive scales, or zero points or
            codes outside their range. The message names the file and the tensor.
    """
    body, tensors = read_checkpoint(path)
    where = str(Path(path) / "config.json")
    unet, quantized, _ = _rebuild(body, where)
    _, slots = export_tensors(quantized, quantized.meta["qdiff_config"].weight_qrange())
    check_tensors(tensors, slots, str(Path(path) / TENSORS_FILE))
    recorded_splits = body.get("splits")
    if _jsonable(quantized.meta.get("qdiff_splits", []), "splits") != recorded_splits:
        raise CheckpointError(f"{where}: the rebuilt split shortcuts differ from the recorded ones {recorded_splits}")
    if body.get("graph_sha256") != graph_fingerprint(quantized):
        saved_with, running = body.get("library"), _library_versions()
        cause = (
            f"it was saved with {saved_with} and this is {running}: re-save it with this version"
            if saved_with != running
            else "the config does not describe the saved model"
        )
        raise CheckpointError(f"{where}: the graph rebuilt from the config differs from the saved one; {cause}")
    import_tensors(quantized, tensors, slots)
    quantized.eval()
    logger.info("loaded %s: %d tensors", path, len(tensors))
    return QuantizedUNet(quantized, config=unet.config).eval()
