"""Compressed checkpoints of quantized UNets: real integer weights (4-bit codes packed two per byte) + qparams.

    qunet = QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
    qunet.save_pretrained("unet-w4a8")                             # -> save_graph(qunet.graph_module, ...)
    pipe.unet = QuantizedUNet.from_pretrained("unet-w4a8")         # bit-identical outputs, no FP weights needed

A checkpoint is a directory with ``model.safetensors`` (tensors, see ``tensor_layout``) and ``config.json``
(format version, the diffusers UNet class and config, the QuantConfig, the trace signature, the split shortcut
records, a fingerprint of the lowered graph, library versions and SHA-256 checks; see ``files``). No
pickle is involved.

:func:`load_graph` rebuilds the lowered graph from the config alone: it instantiates the UNet class from its config
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

from qdiff_ao.backends.x86 import X86Backend
from qdiff_ao.capture.graph_state import TraceInfo, graph_info, update_graph_info
from qdiff_ao.capture.tracing import trace
from qdiff_ao.config import QuantConfig
from qdiff_ao.deploy.checkpoint.files import FORMAT, FORMAT_VERSION, TENSORS_FILE, read_checkpoint, write_checkpoint
from qdiff_ao.deploy.checkpoint.size_guard import check_model_fits_file
from qdiff_ao.deploy.checkpoint.tensor_layout import (
    CheckpointError,
    check_tensors,
    export_tensors,
    graph_fingerprint,
    import_tensors,
)
from qdiff_ao.deploy.timestep_dispatch import lowered_groups_of
from qdiff_ao.passes.denoised_view import PREDICTION_TYPES
from qdiff_ao.passes.output_correction import OUTPUT_CORRECTION, add_output_correction
from qdiff_ao.passes.shortcut_split import split_shortcut
from qdiff_ao.quantizers.float_tail import FloatTail
from qdiff_ao.quantizers.timestep_grids import TimestepGroupGrids

if TYPE_CHECKING:
    from diffusers import ModelMixin  # at runtime diffusers is imported inside the functions that use it

__all__ = ["CheckpointError", "FORMAT_VERSION", "load_graph", "save_graph"]

logger = logging.getLogger(__name__)

_BACKEND = X86Backend()  # checkpoints hold fbgemm/x86 lowered graphs

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


def _trace_record(info: TraceInfo) -> dict[str, Any]:
    inputs = {}
    for name, (ndim, dtype, tail) in info.inputs.items():
        key = str(dtype).removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"input {name!r} was traced as {dtype}; checkpoints support {sorted(_DTYPES)}")
        inputs[name] = {"ndim": int(ndim), "dtype": key, "shape": [int(s) for s in tail]}
    return {
        "input_names": list(info.input_names),
        "inputs": inputs,
        "example_batch_size": info.example_batch_size or 1,
        "decompose_attention": bool(info.decompose_attention),
        "frozen_kwargs": {k: repr(v) for k, v in info.frozen_kwargs.items()},
    }


def _config_record(cfg: Any) -> dict[str, Any]:
    """The QuantConfig as recorded: ``attention_symmetric`` only when set (``QuantConfig.from_dict`` reads its
    absence as ``False``), so checkpoints without it stay byte-identical to those written before it existed."""
    record = cfg.to_dict()
    if not record.get("attention_symmetric"):
        record.pop("attention_symmetric", None)
    return record


def save_graph(
    gm: fx.GraphModule,
    path: str | os.PathLike[str],
    *,
    unet_config: Mapping[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write a converted graph as a compressed checkpoint directory (``QuantizedUNet.save_pretrained`` calls this).

    Weight codes ``q = clamp(round(w / scale) + zero_point, quant_min, quant_max)`` are stored as int8, or two
    per byte when the QuantConfig's weight range fits 4 bits; scales, zero points, biases, activation qparams
    and the remaining float tensors (norms, embeddings) are stored exactly.

    Args:
        gm: the output of ``qdiff_ao.convert`` (its graph info holds the trace record and QuantConfig).
        path: the checkpoint directory; created (with parents). Written atomically.
        unet_config: the diffusers UNet config.
        overwrite: replace an existing qdiff_ao checkpoint at ``path``. Other directories are never replaced.

    Returns:
        The absolute path of the checkpoint.

    Raises:
        TypeError: ``gm`` is not a GraphModule.
        ValueError: the graph was not made by qdiff_ao.trace and prepare/convert (or the raw torch.ao path with
            qdiff_ao's custom configs), is not converted, or the config is not JSON-serialisable.
        FileExistsError: ``path`` exists and may not be replaced.
    """
    if not isinstance(gm, fx.GraphModule):
        raise TypeError(f"save_graph takes a converted fx.GraphModule, got {type(gm).__name__}")
    info = graph_info(gm)
    if info.trace is None or info.config is None:
        missing = "trace record (trace with qdiff_ao.trace)" if info.trace is None else (
            "QuantConfig (prepare with qdiff_ao.prepare, or run passes.observe_softmax(prepared, cfg) after your "
            "own prepare_fx)"
        )
        raise ValueError(f"the graph info has no {missing}, which load() needs to rebuild the graph")
    tensors, _ = export_tensors(gm, info.config.weight_qrange())
    # `_name_or_path` records where diffusers loaded the float model from (a str or a Path): a fact about the
    # user's disk, not about the model, and not JSON-safe when it is a Path.
    config = _jsonable({k: v for k, v in dict(unet_config).items() if k != "_name_or_path"}, "unet_config")
    if isinstance(config.get("_use_default_values"), list):  # diffusers builds it from a set: its order varies
        config["_use_default_values"] = sorted(config["_use_default_values"])
    body = {
        "format": FORMAT,
        "format_version": 1,  # 2 with timestep groups, 3 with input gains (below): older readers keep reading the rest
        "library": _library_versions(),
        "unet_class": str(info.trace.model_class or config.get("_class_name")),
        "unet_config": config,
        "quant_config": _jsonable(_config_record(info.config), "quant_config"),
        "trace": _trace_record(info.trace),
        "split_shortcut": info.splits is not None,
        "splits": _jsonable([r.to_dict() for r in info.splits or ()], "splits"),
        "graph_sha256": graph_fingerprint(gm),
        "num_tensors": len(tensors),
    }
    correction = getattr(gm, OUTPUT_CORRECTION, None)
    if correction is not None:  # absent from checkpoints without one, which therefore read as before
        body["output_correction"] = {"num_groups": int(correction.bias.shape[0]),
                                     "channels": int(correction.bias.shape[1])}
        if correction.gain is not None:  # recorded only with gains: checkpoints without them read as before
            body["output_correction"]["gain"] = True
        if correction.input_gain is not None:  # version 3: an older reader would rebuild the graph without them
            body["output_correction"]["input_gain"] = True
        if correction.prediction_type is not None:  # version 4, as above
            body["output_correction"]["spread"] = correction.prediction_type
            body["output_correction"]["num_train_timesteps"] = correction.layout()["num_train_timesteps"]
    groups = lowered_groups_of(gm)
    if groups is not None and groups.lowered is not None:
        body["format_version"] = 2
        body["timestep_groups"] = {"boundaries": [float(b) for b in groups.boundaries],
                                   "entries": [sorted(e) for e in groups.lowered]}
        tensors = dict(tensors)
        for g, entries in enumerate(groups.lowered):
            tensors.update({f"{_GROUP_PREFIX}{g}.{k}": v.contiguous() for k, v in entries.items()})
        body["num_tensors"] = len(tensors)
    if correction is not None and correction.input_gain is not None:
        body["format_version"] = 3
    if correction is not None and correction.prediction_type is not None:
        body["format_version"] = 4
    tail = info.float_tail
    if isinstance(tail, FloatTail):  # version 5: an older reader would run the tail's steps with integer activations
        body["float_tail"] = tail.to_dict()
        body["format_version"] = 5
    return write_checkpoint(path, body, tensors, overwrite=overwrite)


def _read_float_tail(record: Any, where: str) -> FloatTail:
    below: Any = record.get("below") if isinstance(record, dict) else None
    try:  # FloatTail checks the boundary itself
        return FloatTail(below)
    except ValueError as err:
        raise CheckpointError(f"{where}: field 'float_tail' must be {{\"below\": a timestep >= 0}}, got {record!r} "
                              f"({err})") from err


_GROUP_PREFIX = "timestep_groups."  # tensor names of the per-group qparams: timestep_groups.<g>.<state-dict key>


def _read_groups(body: Mapping[str, Any], tensors: dict[str, torch.Tensor], quantized: fx.GraphModule,
                 where: str) -> TimestepGroupGrids | None:
    """The lowered timestep groups recorded in a checkpoint (their tensors are popped from ``tensors``), checked
    against the rebuilt graph: every entry names one of its qparam tensors, with that tensor's shape and dtype."""
    found = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(_GROUP_PREFIX)]}
    record = body.get("timestep_groups")
    if record is None:
        if found:
            raise CheckpointError(f"{where}: the file holds timestep-group tensors but the config records no groups")
        return None
    boundaries, names = (record.get("boundaries"), record.get("entries")) if isinstance(record, dict) else (None, None)
    if not isinstance(boundaries, list) or not isinstance(names, list) or len(names) != len(boundaries) + 1 or not all(
            isinstance(b, (int, float)) and not isinstance(b, bool) for b in boundaries) or boundaries != sorted(
            boundaries) or not all(isinstance(n, list) and all(isinstance(k, str) for k in n) for n in names):
        raise CheckpointError(f"{where}: field 'timestep_groups' must hold ascending 'boundaries' and one list of "
                              f"'entries' per group (one more than boundaries), got {record!r}")
    expected = {f"{_GROUP_PREFIX}{g}.{k}" for g, keys in enumerate(names) for k in keys}
    if set(found) != expected:
        raise CheckpointError(f"{where}: the timestep-group tensors {sorted(set(found) ^ expected)[:4]} do not "
                              "match the recorded entries; the file was edited")
    reference = {k: v for k, v in quantized.state_dict().items() if isinstance(v, torch.Tensor) and not v.is_quantized}
    lowered = []
    for g, keys in enumerate(names):
        entries = {}
        for key in keys:
            value, like = found[f"{_GROUP_PREFIX}{g}.{key}"], reference.get(key)
            if like is None or value.shape != like.shape or value.dtype != like.dtype:
                raise CheckpointError(f"{where}: timestep group {g} entry {key!r} is not a qparam of the rebuilt "
                                      f"graph with its shape and dtype ({None if like is None else like.dtype})")
            if value.is_floating_point() and not bool((torch.isfinite(value) & (value > 0)).all()):
                raise CheckpointError(f"{where}: timestep group {g} scale {key!r} is not finite and > 0")
            entries[key] = value
        lowered.append(entries)
    return TimestepGroupGrids(tuple(float(b) for b in boundaries), {}, lowered=tuple(lowered))


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
        logger.warning("%s: %s; the model loads, but its graph info's QuantConfig lacks the custom observers", where,
                       err)
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


def _rebuild(
    body: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], where: str
) -> tuple[nn.Module, fx.GraphModule, QuantConfig]:
    """The UNet (random weights) and its lowered graph, rebuilt from the config alone (once the config is known to
    describe a model no larger than ``tensors``)."""
    cls = _unet_class(_field(body, "unet_class", str, where), where)
    unet_config = _field(body, "unet_config", dict, where)
    check_model_fits_file(cls, unet_config, tensors, where)
    saved_cfg, skeleton_cfg = _quant_config(_field(body, "quant_config", dict, where), where)
    record = _field(body, "trace", dict, where)
    split = _field(body, "split_shortcut", bool, where)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            unet = cls.from_config(dict(unet_config)).eval()
            inputs = _example_inputs(record, where)
            gm = trace(unet, inputs, decompose_attention=bool(record.get("decompose_attention", True)), copy=False)
            if split:
                gm = split_shortcut(gm)
            prepared = _BACKEND.prepare(gm, skeleton_cfg, inputs)
            correction = body.get("output_correction")
            if correction is not None:
                if not isinstance(correction, dict) or not all(
                    isinstance(correction.get(k), int) and correction[k] >= 1 for k in ("num_groups", "channels")
                ):
                    raise CheckpointError(f"{where}: field 'output_correction' must hold positive integers "
                                          f"num_groups and channels, got {correction!r}")
                for flag in ("gain", "input_gain"):
                    if not isinstance(correction.get(flag, False), bool):
                        raise CheckpointError(f"{where}: field 'output_correction.{flag}' must be true or false, "
                                              f"got {correction[flag]!r}")
                spread = correction.get("spread")
                if spread is not None and spread not in PREDICTION_TYPES:
                    raise CheckpointError(f"{where}: field 'output_correction.spread' must be one of "
                                          f"{PREDICTION_TYPES}, got {spread!r}")
                steps = correction.get("num_train_timesteps", 1000)
                if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
                    raise CheckpointError(f"{where}: field 'output_correction.num_train_timesteps' must be a "
                                          f"positive integer, got {steps!r}")
                add_output_correction(prepared, correction["num_groups"], correction["channels"],
                                      gain=correction.get("gain", False),
                                      input_gain=correction.get("input_gain", False), spread=spread,
                                      num_train_timesteps=steps)
            with torch.no_grad():
                prepared(**inputs)
            quantized = _BACKEND.convert(prepared)
        except CheckpointError:
            raise
        except Exception as err:  # diffusers / tracing errors on a config that does not describe this model
            raise CheckpointError(
                f"{where}: cannot rebuild {cls.__name__} from the recorded config and inputs "
                f"({type(err).__name__}: {err})"
            ) from err
    update_graph_info(quantized, config=saved_cfg)
    return unet, quantized, saved_cfg


def load_graph(path: str | os.PathLike[str]) -> tuple[fx.GraphModule, Any]:
    """Load a checkpoint written by :func:`save_graph`: (the converted graph, the diffusers UNet config).

    ``QuantizedUNet.from_pretrained`` wraps the result; its outputs equal the saved model's.

    Raises:
        CheckpointError: (a ``ValueError``) the directory is not a qdiff_ao checkpoint, has another format
            version, a file is truncated or corrupted, the config describes another model than the tensors,
            or a tensor has the wrong shape or dtype, non-finite or non-positive scales, or zero points or
            codes outside their range. The message names the file and the tensor.
    """
    body, tensors = read_checkpoint(path)
    where = str(Path(path) / "config.json")
    group_tensors = {k: tensors.pop(k) for k in [k for k in tensors if k.startswith(_GROUP_PREFIX)]}
    unet, quantized, saved_cfg = _rebuild(body, tensors, where)
    groups = _read_groups(body, group_tensors, quantized, where)
    _, slots = export_tensors(quantized, saved_cfg.weight_qrange())
    check_tensors(tensors, slots, str(Path(path) / TENSORS_FILE))
    recorded_splits = body.get("splits")
    rebuilt_splits = [r.to_dict() for r in graph_info(quantized).splits or ()]
    if _jsonable(rebuilt_splits, "splits") != recorded_splits:
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
    if groups is not None:
        update_graph_info(quantized, timestep_groups=groups)
    if "float_tail" in body:
        update_graph_info(quantized, float_tail=_read_float_tail(body["float_tail"], where))
    quantized.eval()
    logger.info("loaded %s: %d tensors", path, len(tensors))
    return quantized, unet.config
