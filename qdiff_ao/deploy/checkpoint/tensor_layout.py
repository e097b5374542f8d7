"""Tensor layout of a qdiff_ao checkpoint: which tensors a lowered graph is made of and how they are stored.

A converted GraphModule is flattened into named tensors (safetensors keys are ``<module path>.<attribute>``):

    torch.ao quantized Conv2d / Linear at "p"   (W?A8, fbgemm kernels)
        p.weight              int8 codes, or uint8 with two signed 4-bit codes per byte when the config's
                              weight range fits [-8, 7] (low nibble first, flat, zero padded)
        p.weight_scale        float64 [C_out] per channel, [] per tensor
        p.weight_zero_point   int32, same shape
        p.bias                float32 [C_out] (absent without bias)
        p.scale, p.zero_point float64 [] and int32 []: the requantization of the output
    torch.ao reference Conv2d / Linear at "p"   (weights only, W?A32)
        p.weight, p.weight_scale (float32), p.weight_zero_point (int32), p.bias as above
    every other parameter, buffer and get_attr tensor
        as it is (activation qparams such as ``_scale_0`` / ``_zero_point_0``, GroupNorm affine weights, the
        scale / zero_point of 16-bit softmax ``FixedFakeQuantize`` modules, ...)

A weight code is ``q = clamp(round(w / scale) + zero_point, quant_min, quant_max)``; the packed byte holding codes
``q0`` and ``q1`` is ``(q0 & 0xF) | (q1 & 0xF) << 4`` and unpacks by sign extension ``v - 16 if v >= 8``.

:func:`export_tensors` returns the tensors and a :class:`TensorSlot` per tensor (shape, dtype and value checks),
:func:`check_tensors` validates tensors read from a file against the slots of a freshly built graph, and
:func:`import_tensors` writes them into that graph.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.ao.nn.quantized as nnq
import torch.ao.nn.quantized.reference as nnqr
from torch import fx, nn

from qdiff_ao.deploy.checkpoint.int4 import INT4_RANGE, pack_int4, packed_padding, unpack_int4
from qdiff_ao.quantizers.fixed import FixedFakeQuantize

__all__ = [
    "CheckpointError",
    "TensorSlot",
    "check_tensors",
    "export_tensors",
    "graph_fingerprint",
    "import_tensors",
    "pack_int4",
    "unpack_int4",
]

_QUANTIZED = (nnq.Conv2d, nnq.Linear)
_REFERENCE = (nnqr.Conv2d, nnqr.Linear)
# Module attributes that the lowered graph's numerics depend on and that tensor shapes do not reveal.
_SETTINGS = (
    "num_groups", "eps", "affine", "normalized_shape", "elementwise_affine", "kernel_size", "stride", "padding",
    "dilation", "groups", "padding_mode", "output_padding", "transposed", "p", "approximate", "negative_slope",
    "dim", "quant_min", "quant_max", "weight_quant_min", "weight_quant_max", "weight_qscheme", "weight_dtype",
)
_NOUNS = {"codes": "weight codes", "zero_point": "zero points"}
_QDTYPE_BOUNDS = {
    torch.quint8: (0, 255),
    torch.qint8: (-128, 127),
    torch.qint32: (-(2**31), 2**31 - 1),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded: missing, corrupted, of another format or not matching its config."""


@dataclass(frozen=True)
class TensorSlot:
    """What one stored tensor must look like.

    Attributes:
        kind: "codes" (weight codes), "scale" (finite, > 0), "zero_point" (integer in ``bounds``) or "tensor".
        shape, dtype: the stored shape and dtype.
        bounds: allowed [min, max] of codes and zero points.
        code_shape: the weight shape of packed 4-bit codes (``shape`` is then ``[ceil(numel / 2)]``).
    """

    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    bounds: tuple[int, int] | None = None
    code_shape: tuple[int, ...] | None = None


def _tensor_slot(t: torch.Tensor, kind: str = "tensor", bounds: tuple[int, int] | None = None) -> TensorSlot:
    return TensorSlot(kind, tuple(t.shape), t.dtype, bounds)


def _activation_qparams(gm: fx.GraphModule) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """get_attr targets read as scale / zero_point by quantize nodes -> (kind, bounds of the quantized dtype)."""
    roles: dict[str, tuple[str, tuple[int, int] | None]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.quantize_per_tensor or len(node.args) < 4:
            continue
        scale, zero_point, dtype = node.args[1], node.args[2], node.args[3]
        if isinstance(scale, fx.Node) and scale.op == "get_attr":
            roles[str(scale.target)] = ("scale", None)
        if isinstance(zero_point, fx.Node) and zero_point.op == "get_attr":
            roles[str(zero_point.target)] = ("zero_point", _QDTYPE_BOUNDS.get(dtype))
    return roles


def _join(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def _modules(gm: fx.GraphModule) -> Iterator[tuple[str, nn.Module]]:
    """named_modules() without the internals of quantized modules (their packed params are read via weight())."""
    skip: list[str] = []
    for path, module in gm.named_modules():
        if any(path.startswith(prefix + ".") for prefix in skip):
            continue
        if isinstance(module, _QUANTIZED):
            skip.append(path)
        yield path, module


def _weight_qparams(qweight: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    if qweight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        if qweight.q_per_channel_axis() != 0:
            raise ValueError(f"{path}: weight quantized along axis {qweight.q_per_channel_axis()}; expected 0")
        return qweight.q_per_channel_scales().double(), qweight.q_per_channel_zero_points().int()
    return torch.tensor(qweight.q_scale(), dtype=torch.float64), torch.tensor(qweight.q_zero_point()).int()


def export_tensors(
    gm: fx.GraphModule, weight_qrange: tuple[int, int]
) -> tuple[dict[str, torch.Tensor], dict[str, TensorSlot]]:
    """Flatten a converted graph into named CPU tensors (see the module docstring) and their slots.

    Args:
        gm: the output of ``qdiff_ao.convert`` (no observers left).
        weight_qrange: the config's [quant_min, quant_max] of weight codes; codes are packed two per byte when
            it fits [-8, 7].

    Raises:
        ValueError: the graph still has observers, holds a quantized module of another kind, or has weight
            codes outside ``weight_qrange``.
    """
    packed = INT4_RANGE[0] <= weight_qrange[0] and weight_qrange[1] <= INT4_RANGE[1]
    tensors: dict[str, torch.Tensor] = {}
    slots: dict[str, TensorSlot] = {}

    def put(name: str, t: torch.Tensor, slot: TensorSlot | None = None) -> None:
        t = t.detach().cpu().contiguous()
        if t.is_quantized:
            raise ValueError(f"{name}: quantized tensor outside a quantized Conv2d/Linear; not supported")
        tensors[name], slots[name] = t, slot or _tensor_slot(t)

    def put_codes(path: str, codes: torch.Tensor) -> None:
        lo, hi = int(codes.min()), int(codes.max())
        if lo < weight_qrange[0] or hi > weight_qrange[1]:
            raise ValueError(
                f"{path}: weight codes span [{lo}, {hi}] but the QuantConfig allows {list(weight_qrange)}; "
                "the graph was not converted with this config (use qdiff_ao.convert)"
            )
        stored = pack_int4(codes) if packed else codes
        slot = TensorSlot("codes", tuple(stored.shape), stored.dtype, weight_qrange,
                          tuple(codes.shape) if packed else None)
        put(_join(path, "weight"), stored, slot)

    def put_qparams(prefix: str, scale: torch.Tensor, zero_point: torch.Tensor, bounds: tuple[int, int]) -> None:
        put(f"{prefix}scale", scale, _tensor_slot(scale, "scale"))
        put(f"{prefix}zero_point", zero_point, _tensor_slot(zero_point, "zero_point", bounds))

    roles = _activation_qparams(gm)
    for path, module in _modules(gm):
        if type(module).__name__.endswith("Observer") or hasattr(module, "calculate_qparams"):
            raise ValueError(f"{path or 'the graph'} is an observer: convert the prepared graph before saving")
        handled: set[str] = set()
        if isinstance(module, _QUANTIZED):
            qweight = module.weight()
            put_codes(path, qweight.int_repr())
            put_qparams(_join(path, "weight_"), *_weight_qparams(qweight, path), _QDTYPE_BOUNDS[qweight.dtype])
            if module.bias() is not None:
                put(_join(path, "bias"), module.bias().float())
            put_qparams(_join(path, ""), torch.tensor(module.scale, dtype=torch.float64),
                        torch.tensor(module.zero_point, dtype=torch.int32), _QDTYPE_BOUNDS[torch.quint8])
            continue
        if module.__class__.__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")) and not (
            isinstance(module, _REFERENCE)
        ):
            raise ValueError(f"{path}: {type(module).__name__} is not supported by qdiff_ao checkpoints")
        if isinstance(module, _REFERENCE):
            put_codes(path, module.get_quantized_weight().int_repr())
            put_qparams(_join(path, "weight_"), cast(torch.Tensor, module.weight_scale).float(),  # buffers
                        cast(torch.Tensor, module.weight_zero_point).int(), _QDTYPE_BOUNDS[module.weight_dtype])
            handled = {"weight", "weight_scale", "weight_zero_point"}
        own_params = {n: t for n, t in module.named_parameters(recurse=False)}
        own = {**own_params, **dict(module.named_buffers(recurse=False))}
        for name, t in own.items():
            if name in handled:
                continue
            full = _join(path, name)
            if isinstance(module, FixedFakeQuantize) and name in ("scale", "zero_point"):
                kind = "scale" if name == "scale" else "zero_point"
                bounds = (module.quant_min, module.quant_max) if kind == "zero_point" else None
                put(full, t, _tensor_slot(t, kind, bounds))
            elif full in roles:
                put(full, t, _tensor_slot(t, *roles[full]))
            else:
                put(full, t)
    for node in gm.graph.nodes:  # tensors fx stored as plain attributes
        if node.op == "get_attr" and str(node.target) not in tensors:
            value = _resolve(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                kind, bounds = roles.get(str(node.target), ("tensor", None))
                put(str(node.target), value, _tensor_slot(value, kind, bounds))
    return tensors, slots


def _resolve(gm: nn.Module, target: str) -> Any:
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return getattr(owner, attr)


def check_tensors(tensors: Mapping[str, torch.Tensor], slots: Mapping[str, TensorSlot], filename: str) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` has exactly the slots' names, shapes, dtypes and values.

    Checks: no missing or extra names; shape and dtype equal; every float tensor finite, scales > 0; zero points
    and codes inside their bounds; the padding nibble of packed codes zero.
    """
    missing = sorted(set(slots) - set(tensors))
    extra = sorted(set(tensors) - set(slots))
    if missing or extra:
        raise CheckpointError(
            f"{filename}: the tensors do not match the model its config describes: missing {_short(missing)}, "
            f"unexpected {_short(extra)}; the file belongs to another model or was edited"
        )
    for name, slot in slots.items():
        t = tensors[name]
        if tuple(t.shape) != slot.shape or t.dtype != slot.dtype:
            raise CheckpointError(
                f"{filename}: tensor {name!r} is {t.dtype} of shape {tuple(t.shape)}, but the config needs "
                f"{slot.dtype} of shape {slot.shape}"
            )
        if slot.kind == "scale" and not bool((torch.isfinite(t) & (t > 0)).all()):
            raise CheckpointError(f"{filename}: tensor {name!r} holds scales that are not finite and > 0: {_few(t)}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):  # biases, norm weights, embeddings
            bad = t.reshape(-1)[~torch.isfinite(t.reshape(-1))]
            raise CheckpointError(f"{filename}: tensor {name!r} holds non-finite values {bad[:4].tolist()}; a "
                                  "saved model never does: the file was edited")
        if slot.kind in ("zero_point", "codes") and slot.bounds is not None and t.numel():
            values = unpack_int4(t, slot.code_shape) if slot.code_shape is not None else t
            lo, hi = slot.bounds
            if int(values.min()) < lo or int(values.max()) > hi:
                raise CheckpointError(
                    f"{filename}: tensor {name!r} has {_NOUNS[slot.kind]} outside [{lo}, {hi}] "
                    f"(found [{int(values.min())}, {int(values.max())}])"
                )
            if slot.code_shape is not None and packed_padding(t, slot.code_shape):
                raise CheckpointError(f"{filename}: tensor {name!r} has a nonzero padding nibble")


def _short(names: list[str]) -> str:
    return "none" if not names else repr(names[:5])[:-1] + (f", ... ({len(names)} in all)]" if len(names) > 5 else "]")


def _few(t: torch.Tensor) -> str:
    flat = t.reshape(-1)
    bad = flat[~(torch.isfinite(flat) & (flat > 0))]
    return str(bad[:4].tolist())


def import_tensors(gm: fx.GraphModule, tensors: Mapping[str, torch.Tensor], slots: Mapping[str, TensorSlot]) -> None:
    """Write checked ``tensors`` into ``gm``, a graph built from the same config as the one saved.

    Quantized modules get new packed weights (``set_weight_bias``) and output qparams; reference modules get
    the float weight ``w = (q - zero_point) * scale``, which their forward re-quantizes to exactly ``q``
    (``|w / scale - (q - zero_point)| <= 128 * 2^-23 << 1/2``); every other tensor is copied in place.
    """

    def codes(path: str) -> torch.Tensor:
        name, slot = _join(path, "weight"), slots[_join(path, "weight")]
        t = tensors[name]
        return unpack_int4(t, slot.code_shape) if slot.code_shape is not None else t

    with torch.no_grad():
        for path, module in _modules(gm):
            handled: set[str] = set()
            if isinstance(module, _QUANTIZED):
                q = codes(path)
                scale, zero_point = tensors[_join(path, "weight_scale")], tensors[_join(path, "weight_zero_point")]
                if scale.dim() == 1:
                    qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero_point.long(), 0)
                else:
                    qweight = torch._make_per_tensor_quantized_tensor(q, float(scale), int(zero_point))
                bias = tensors.get(_join(path, "bias"))
                module.set_weight_bias(qweight, bias.clone() if bias is not None else None)
                module.scale = float(tensors[_join(path, "scale")])
                module.zero_point = int(tensors[_join(path, "zero_point")])
                continue
            if isinstance(module, _REFERENCE):
                q = codes(path).float()
                scale = tensors[_join(path, "weight_scale")]
                zero_point = tensors[_join(path, "weight_zero_point")]
                view = (-1,) + (1,) * (q.dim() - 1) if scale.dim() == 1 else ()
                module.weight.copy_((q - zero_point.float().reshape(view)) * scale.reshape(view))
                cast(torch.Tensor, module.weight_scale).copy_(scale)  # buffers of torch.ao reference modules
                cast(torch.Tensor, module.weight_zero_point).copy_(zero_point)
                handled = {"weight", "weight_scale", "weight_zero_point"}
            own = {**dict(module.named_parameters(recurse=False)), **dict(module.named_buffers(recurse=False))}
            for name, t in own.items():
                if name not in handled:
                    t.copy_(tensors[_join(path, name)])
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                value = _resolve(gm, str(node.target))
                if isinstance(value, torch.Tensor) and str(node.target) in tensors:
                    value.copy_(tensors[str(node.target)])


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
    if module == "qdiff_ao" or module.startswith("qdiff_ao."):
        # Our own functions (the input guard) by name alone: the fingerprint describes the graph, not where a
        # function lives inside qdiff_ao, so moving code does not invalidate saved checkpoints.
        return f"qdiff_ao:{name}"
    return f"{module}.{name}"


def _arg_repr(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_arg_repr(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {_arg_repr(v)}" for k, v in arg.items()) + "}"
    if callable(arg) and not isinstance(arg, torch.Tensor):
        return _target_name(arg)
    return repr(arg)


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """SHA-256 of the graph's structure: nodes (op, name, target, arguments) and module settings, no tensor data.

    A loaded checkpoint must rebuild exactly the graph that was saved; this is how load checks it.
    """
    digest = hashlib.sha256()
    for node in gm.graph.nodes:
        line = f"{node.op}|{node.name}|{_target_name(node.target)}|{_arg_repr(node.args)}|{_arg_repr(node.kwargs)}"
        digest.update(line.encode() + b"\n")
    for path, module in _modules(gm):
        digest.update(f"{path}:{type(module).__qualname__}({_settings(module)})\n".encode())
    return digest.hexdigest()


def _settings(module: nn.Module) -> str:
    """The settings of torch's own layers (GroupNorm groups, conv strides, clamp ranges, ...), qparams excluded.

    Read from attributes rather than ``extra_repr`` so the fingerprint does not change with torch's repr text.
    """
    values = []
    for name in _SETTINGS:
        value = module.__dict__.get(name)
        if isinstance(value, (bool, int, float, str, tuple, torch.dtype, torch.qscheme)):
            values.append(f"{name}={value!r}")
    return ", ".join(values)
