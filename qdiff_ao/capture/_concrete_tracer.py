"""Machinery behind :func:`qdiff_ao.capture.tracing.trace`: a concrete-value ``torch.fx`` tracer.

Every proxy carries the real value computed alongside it, so Python control flow in the model
(``if``, ``assert``, ``len``, ``int``, iteration, indexing a Python list with a traced size)
resolves at trace time, while tensor operations are recorded as graph nodes::

    model.forward(sample, timestep)          graph
    ─────────────────────────────            ───────────────────────────────────────────
    b = sample.shape[0]            ──►  getattr(sample, "shape") ─► getitem(·, 0)   (node)
    if len(t.shape) == 0: ...      ──►  resolved on the concrete value              (no node)
    h = self.conv_in(sample)       ──►  call_module "conv_in"                       (node)
    F.scaled_dot_product_attention ──►  mul(q, scale) ─► matmul ─► softmax ─► matmul   (nodes)

No private torch API is used. Two torch.fx hooks this relies on are public but marked
``is_backward_compatible=False`` (they may change between torch releases; tested on 2.14):

* ``ConcreteTracer.create_args_for_root`` creates one placeholder per example input and calls
  the forward with keyword arguments;
* ``ConcreteTracer.getattr`` (with ``call_module``) hands out plain parameters and runs modules
  directly while a concrete value is computed: ``fx.Tracer.trace`` patches
  ``nn.Module.__call__``/``__getattr__`` for the whole trace, and the real modules must not
  see proxies.

``torch_patches`` is the only place that patches torch globals (see its docstring).

Limitations (none is hit by diffusers 0.42 UNet2DModel / UNet2DConditionModel):

* ``isinstance(x, torch.Tensor)`` is False for a traced value (``torch.is_tensor`` is patched);
* ``x += y`` on a traced tensor is recorded out of place, so code relying on the aliasing of an
  augmented assignment would differ from eager (``x[idx] = y`` is recorded in place);
* control flow that depends on the batch size is frozen at the example's batch size
  (diffusers' ``Upsample2D`` calls ``.contiguous()`` for batch >= 64: numerically neutral).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import operator
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import fx
from torch.fx.node import Argument, Target, map_aggregate

from qdiff_ao.capture.graph_state import ATTENTION_ROLE

if TYPE_CHECKING:
    from typing_extensions import TypeIs

__all__ = ["ConcreteProxy", "ConcreteTracer", "torch_patches"]

log = logging.getLogger(__name__)

_MISSING = object()

# Tensor attributes read as plain Python values. They are fixed for a trace (rank, dtype and
# device are specialised; the input guard enforces rank and dtype), and factories such as
# ``torch.ones(n, device=t.device)`` need a real device, not a proxy.
_STATIC_ATTRS = frozenset(
    {
        "dtype",
        "device",
        "ndim",
        "layout",
        "is_cuda",
        "is_cpu",
        "is_mps",
        "is_meta",
        "is_sparse",
        "is_quantized",
        "is_nested",
        "requires_grad",
    }
)

# Factories taking the size as varargs: ``torch.empty(p0, p1, p2)`` with traced ints fails in the
# C++ argument parser, while the one-tuple form ``torch.empty((p0, p1, p2))`` dispatches to
# ``__torch_function__``, is recorded as an ordinary node and is re-traced by prepare_fx as is.
_VARARG_FACTORIES = ("empty", "zeros", "ones", "rand", "randn")


def _concrete(a: Any) -> Any:
    """Replace every ConcreteProxy inside ``a`` (nested tuples/lists/dicts/slices) by its value."""
    return map_aggregate(a, lambda x: x.value if isinstance(x, ConcreteProxy) else x)


def _contains_proxy(a: Any) -> bool:
    found: list[bool] = []
    map_aggregate(a, lambda x: found.append(True) if isinstance(x, ConcreteProxy) else None)
    return bool(found)


class ConcreteProxy(fx.Proxy):
    """An ``fx.Proxy`` that also holds ``value``, the concrete result of its node."""

    value: Any = _MISSING

    def __getattr__(self, k: str) -> Any:
        if k.startswith("__") and k.endswith("__"):
            raise AttributeError(k)
        val = getattr(self.value, k)  # AttributeError here keeps hasattr() truthful
        if k in _STATIC_ATTRS:
            return val
        attr = ConcreteAttribute(self, k)
        attr.value = val
        return attr

    def __len__(self) -> int:  # len(t.shape)
        return len(self.value)

    def __index__(self) -> int:  # range(n), list slicing with a traced int
        return operator.index(self.value)

    def __int__(self) -> int:
        return int(self.value)

    def __float__(self) -> float:
        return float(self.value)

    def __contains__(self, item: Any) -> bool:
        return _concrete(item) in self.value

    def __setitem__(self, key: Any, value: Any) -> None:  # x[..., :c] = y, in place as in eager
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


class ConcreteAttribute(fx.proxy.Attribute, ConcreteProxy):
    """``proxy.attr``: a method call becomes a ``call_method`` node, any other use a ``getattr`` node."""


class ConcreteTracer(fx.Tracer):
    """fx tracer whose proxies carry concrete values.

    Args:
        example_inputs: placeholder name -> example value, in the order of the graph inputs.
        frozen_kwargs: keyword arguments passed to ``forward`` as constants (e.g. ``return_dict``).
        output_selector: maps whatever ``forward`` returns to the single traced output.
        decompose_attention: record ``F.scaled_dot_product_attention`` as explicit
            ``mul(q, scale) -> matmul -> softmax -> matmul`` nodes.
    """

    def __init__(
        self,
        example_inputs: Mapping[str, Any],
        frozen_kwargs: Mapping[str, Any],
        output_selector: Callable[[Any], Any],
        decompose_attention: bool,
    ) -> None:
        super().__init__()
        self.example_inputs = dict(example_inputs)
        self.frozen_kwargs = dict(frozen_kwargs)
        self.output_selector = output_selector
        self.decompose_attention = decompose_attention
        self.output_value: Any = _MISSING
        self.num_decomposed_attention = 0
        self._computing = 0  # > 0 while a concrete value is computed: modules run for real

    # -- placeholders ---------------------------------------------------------------------------
    def create_args_for_root(
        self,
        root_fn: Callable[..., Any],
        is_module: bool,
        concrete_args: dict[str, Any] | tuple[Any, ...] | None = None,
    ) -> tuple[Any, list[Any]]:
        placeholders = {n: self.create_proxy("placeholder", n, (), {}) for n in self.example_inputs}

        def flat_forward(root: torch.nn.Module) -> Any:
            out = self.output_selector(root_fn(root, **placeholders, **self.frozen_kwargs))
            self.output_value = out.value if isinstance(out, ConcreteProxy) else out
            return out

        return flat_forward, [self.root]

    # -- proxies --------------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def create_proxy(
        self,
        kind: str,
        target: Target,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        name: str | None = None,
        type_expr: Any | None = None,
        proxy_factory_fn: Callable[[fx.Node], fx.Proxy] | None = None,
    ) -> fx.Proxy:
        if kind == "call_function" and target is F.scaled_dot_product_attention and self.decompose_attention:
            decomposed = _decompose_sdpa(self, args, kwargs)
            if decomposed is not None:
                return decomposed
        value = self._compute(kind, target, args, kwargs)
        # built by self.proxy(): a ConcreteProxy (fx passes no proxy_factory_fn, as param_shapes_constant is False)
        proxy = cast(ConcreteProxy, super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn))
        proxy.value = value
        return proxy

    def _compute(self, kind: str, target: Target, args: Any, kwargs: Any) -> Any:
        """The concrete result of one node, computed eagerly by the real op/module."""
        self._computing += 1
        try:
            return self._compute_value(kind, target, args, kwargs)
        finally:
            self._computing -= 1

    def _compute_value(self, kind: str, target: Target, args: Any, kwargs: Any) -> Any:
        if kind == "placeholder":
            return self.example_inputs[target]  # type: ignore[index]
        if kind == "get_attr":
            obj: Any = self.root
            for atom in str(target).split("."):
                obj = getattr(obj, atom)
            return obj
        a, kw = _concrete(args), _concrete(kwargs)
        if kind == "call_function":
            return target(*a, **kw)  # type: ignore[operator]
        if kind == "call_method":
            return getattr(a[0], target)(*a[1:], **kw)  # type: ignore[arg-type]
        if kind == "call_module":
            return self.root.get_submodule(target)(*a, **kw)  # type: ignore[arg-type]
        raise AssertionError(f"unexpected node kind {kind!r}")

    def create_arg(self, a: Any) -> Argument:
        if isinstance(a, ConcreteProxy):
            return a.node
        if type(a).__module__ == "numpy" and getattr(a, "ndim", None) == 0:
            return a.item()  # e.g. output_scale_factor=np.sqrt(2): generated code has no `np`
        return super().create_arg(a)

    # -- module hooks: while computing a concrete value, behave like plain eager PyTorch ----------
    def call_module(
        self, m: torch.nn.Module, forward: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if self._computing:
            return forward(*args, **kwargs)  # fx's `forward` here is the original Module.__call__
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    # -- Python protocol hooks: resolved on the concrete value ----------------------------------
    def to_bool(self, obj: fx.Proxy) -> bool:
        return bool(obj.value)  # type: ignore[attr-defined]

    def iter(self, obj: fx.Proxy) -> Iterator[Any]:
        proxy: Any = obj  # a ConcreteProxy; fx.Proxy gets __getitem__ at runtime, its stubs do not declare it
        return iter([proxy[i] for i in range(len(proxy.value))])

    def keys(self, obj: fx.Proxy) -> Any:
        return obj.value.keys()  # type: ignore[attr-defined]


def _decompose_sdpa(tracer: ConcreteTracer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Record ``F.scaled_dot_product_attention`` as explicit ops, or return None to keep it whole.

    ``out = softmax((q * scale) @ k^T + mask, dim=-1) @ v`` with ``scale = 1/sqrt(q.size(-1))`` unless
    given. A boolean mask keeps the positions where it is True (``masked_fill(~mask, -inf)``);
    ``is_causal`` adds a constant lower-triangular boolean mask. Calls with ``dropout_p > 0`` or
    ``enable_gqa=True`` are kept as one SDPA node (logged), as they never occur in inference UNets.
    """
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults: dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False}
    defaults.update({"scale": None, "enable_gqa": False})
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    q, k, v, mask = bound["query"], bound["key"], bound["value"], bound["attn_mask"]
    if float(_concrete(bound["dropout_p"])) != 0.0 or bool(_concrete(bound["enable_gqa"])):
        log.warning("scaled_dot_product_attention with dropout_p>0 or enable_gqa kept as one node")
        return None
    q_val, k_val = _concrete(q), _concrete(k)
    scale = bound["scale"]
    scale = 1.0 / math.sqrt(q_val.shape[-1]) if scale is None else float(_concrete(scale))

    # q, k, v are ConcreteProxy: each op below returns a ConcreteProxy (via __torch_function__), not a Tensor
    # Scale q, not the scores: the same product, on a tensor seq/head_dim times smaller (32x for the
    # CIFAR UNet's 256 tokens of dimension 8), which took ~14% of a batch-8 forward when applied to the scores.
    scaled_q: Any = q * scale
    qk: Any = torch.matmul(scaled_q, k.transpose(-1, -2))
    qk.node.meta[ATTENTION_ROLE] = "qk"
    scores: Any = qk
    if bool(_concrete(bound["is_causal"])):
        length, source = q_val.shape[-2], k_val.shape[-2]
        causal = torch.ones(length, source, dtype=torch.bool, device=q_val.device).tril()
        scores = scores.masked_fill(causal.logical_not(), float("-inf"))
    if mask is not None:
        if _concrete(mask).dtype == torch.bool:
            scores = scores.masked_fill(mask.logical_not(), float("-inf"))
        else:
            scores = scores + mask
    if scores is not qk:  # masked: the scores are a node of their own
        scores.node.meta[ATTENTION_ROLE] = "scores"
    probs: Any = torch.softmax(scores, dim=-1)
    probs.node.meta[ATTENTION_ROLE] = "softmax"
    out: Any = torch.matmul(probs, v)
    out.node.meta[ATTENTION_ROLE] = "pv"
    tracer.num_decomposed_attention += 1
    return out


# --- scoped patches of torch globals -----------------------------------------------------------
_PATCH_LOCK = threading.RLock()
_patch_depth = 0
_saved_torch_attrs: dict[str, Any] = {}


def _is_tensor(orig: Callable[[Any], bool]) -> Callable[[Any], bool]:
    @functools.wraps(orig)
    def is_tensor(obj: Any) -> bool:
        if isinstance(obj, ConcreteProxy):
            return isinstance(obj.value, torch.Tensor)
        return orig(obj)

    return is_tensor


def _vararg_factory(orig: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(orig)
    def factory(*args: Any, **kwargs: Any) -> Any:
        if len(args) > 1 and _contains_proxy(args):
            return orig(tuple(args), **kwargs)
        return orig(*args, **kwargs)

    return factory


@contextlib.contextmanager
def torch_patches() -> Iterator[None]:
    """Patch ``torch.is_tensor`` and the varargs factories for the duration of a trace.

    * ``torch.is_tensor(proxy)`` is True when the proxy's value is a tensor (diffusers:
      ``if not torch.is_tensor(timesteps): timesteps = torch.tensor([timesteps])``).
    * ``torch.empty/zeros/ones/rand/randn(*sizes)`` with a traced size is rewritten to the
      one-tuple form, which fx records (diffusers' classic attention:
      ``torch.empty(q.shape[0], q.shape[1], k.shape[1])``).

    The replacements behave exactly like the originals for every argument that is not a
    ``ConcreteProxy``, so other threads running torch code meanwhile are unaffected. Traces hold a
    module lock (re-entrant: a nested trace reuses the patches); the originals are restored in
    ``finally`` when the outermost trace ends, even on error.
    """
    global _patch_depth
    with _PATCH_LOCK:
        if _patch_depth == 0:
            _saved_torch_attrs["is_tensor"] = torch.is_tensor
            # a drop-in for torch.is_tensor (whose stub returns TypeIs[Tensor]), also True for a tensor proxy
            torch.is_tensor = cast("Callable[[object], TypeIs[torch.Tensor]]", _is_tensor(torch.is_tensor))
            for name in _VARARG_FACTORIES:
                _saved_torch_attrs[name] = getattr(torch, name)
                setattr(torch, name, _vararg_factory(_saved_torch_attrs[name]))
        _patch_depth += 1
        try:
            yield
        finally:
            _patch_depth -= 1
            if _patch_depth == 0:
                for name, orig in _saved_torch_attrs.items():
                    setattr(torch, name, orig)
                _saved_torch_attrs.clear()
