"""Flatten a diffusers UNet into one ``torch.fx.GraphModule`` that torch.ao ``prepare_fx`` can consume.

``torch.fx.symbolic_trace`` fails on diffusers UNets (``len(timesteps.shape)``, shape asserts,
shape-dependent branches). :func:`trace` runs the model once on example inputs with a tracer
whose proxies carry the concrete values (see ``qdiff_ao/capture/_concrete_tracer.py``): Python control flow
is resolved on those values and frozen, tensor operations are recorded::

    UNet2DModel(sample, timestep, class_labels=None, return_dict=True) -> UNet2DOutput
                                  │ trace(unet, {"sample": x, "timestep": t})
                                  ▼
    GraphModule.forward(sample, timestep) -> Tensor
      sample ─► _check_traced_input ─► conv_in ─► down_blocks.* ─► mid_block.* ─► up_blocks.* ─► conv_out
      timestep ─► _check_traced_input ─► time_proj ─► time_embedding ─┘ (into every resnet)

What stays free and what is frozen:

* the batch size (dim 0 of every input) stays free: shapes are read through ``size``/``getitem``
  nodes, so the graph works for any batch size;
* rank, dtype and the non-batch dims of each input, the device, every forward argument not in
  ``example_inputs`` and all Python control flow are fixed at trace time. A guard node at each
  input refuses calls that differ in rank, dtype or non-batch dims.

The timestep should be traced as a 1-d tensor (length = batch, or 1 to broadcast), which is what
calibration feeds; the traced graph then accepts any 1-d timestep tensor of that dtype whose
length is the batch size or 1.
"""

from __future__ import annotations

import copy as copy_module
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from qdiff_ao.capture import _concrete_tracer
from qdiff_ao.capture.devices import module_device, to_device
from qdiff_ao.capture.graph_state import QDiffGraphInfo, TraceInfo, set_graph_info
from qdiff_ao.capture.input_guards import _check_traced_input

__all__ = ["trace"]

log = logging.getLogger(__name__)



def trace(
    model: torch.nn.Module,
    example_inputs: Mapping[str, torch.Tensor],
    *,
    decompose_attention: bool = True,
    copy: bool = True,
) -> fx.GraphModule:
    """Trace a diffusers UNet into a flat GraphModule returning the output sample.

    The graph computes ``model(**inputs, return_dict=False)[0]``: the same function as the eager
    model for every batch size, with everything else specialised to the example.

    Args:
        model: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (any ``nn.Module`` whose
            forward returns a tensor, a tuple starting with one, or an object with ``.sample``).
            Put it in ``eval()`` mode first.
        example_inputs: forward argument name -> example tensor, e.g.
            ``{"sample": x, "timestep": t, "encoder_hidden_states": c}``. Other forward
            arguments are frozen to their defaults, except ``return_dict=False``. Trace the
            timestep as a 1-d tensor: the graph then accepts a 1-d timestep of length batch or 1.
        decompose_attention: record each ``F.scaled_dot_product_attention`` as
            ``matmul(q, k.transpose(-1, -2)) * scale -> softmax(dim=-1) -> matmul(probs, v)`` so
            a quantizer can observe Q, K, V and the softmax output (nodes tagged
            ``node.meta[ATTENTION_ROLE]`` = "qk" / "scores" / "softmax" / "pv"); False keeps one SDPA
            node. The classic ``AttnProcessor`` already records ``baddbmm -> softmax -> bmm``.
        copy: deep-copy the model first so passes that later replace weights in the
            GraphModule never touch ``model``. With False the GraphModule shares its modules.

    Returns:
        A ``GraphModule`` whose ``forward`` takes the ``example_inputs`` keys (in the model
        forward's order) and returns one tensor. Its ``graph_info(gm)`` holds the
        :class:`~qdiff_ao.capture.graph_state.TraceInfo` (input names and signatures, model class,
        attention decomposition, frozen kwargs, example batch size) and the module types; nodes carry ``tensor_meta``
        (``ShapeProp``) and ``nn_module_stack``, and ``call_module`` targets are the model's
        qualified names (e.g. ``"up_blocks.0.resnets.1.conv1"``).

    Note:
        Like ``torch.fx.symbolic_trace``, tracing patches ``nn.Module.__call__`` while it runs, so
        don't run other modules in other threads during a trace.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, ``example_inputs`` is not a mapping of
            tensors, or the forward output holds no tensor sample.
        ValueError: an example name is not a forward argument, or a required one is missing.
        RuntimeError: replaying the graph on the example does not reproduce the traced output.

    Example:
        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3,
        ...     block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=1,
        ...     down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        ...     up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=4).eval()
        >>> gm = trace(unet, {"sample": torch.randn(1, 3, 8, 8), "timestep": torch.tensor([10])})
        >>> x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 20])
        >>> bool((gm(x, t) - unet(x, t).sample).abs().max() < 1e-5)
        True
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, received {type(model).__name__}")
    forward = type(model).forward
    input_names, frozen = _bind_inputs(model, forward, example_inputs)
    example_inputs = to_device(example_inputs, module_device(model))  # e.g. CPU calibration rows, GPU model
    if model.training:
        log.warning(
            "tracing %s in training mode freezes training-mode control flow; call model.eval() "
            "before trace() for post-training quantization",
            type(model).__name__,
        )
    root = copy_module.deepcopy(model) if copy else model
    examples = {n: example_inputs[n] for n in input_names}
    # The concrete run sees clones, so in-place ops in the model cannot change the user's tensors.
    concrete_inputs = {n: t.detach().clone() for n, t in examples.items()}
    tracer = _concrete_tracer.ConcreteTracer(
        concrete_inputs, frozen, _select_sample, decompose_attention=decompose_attention
    )
    attrs_before = set(vars(root))
    with _concrete_tracer.torch_patches(), torch.no_grad():
        traced = tracer.trace(root)
    # Copy into a plain Graph: the traced one names ConcreteTracer as its tracer class, which
    # GraphModule deepcopy/unpickle would try to instantiate without example inputs.
    graph = fx.Graph()
    graph.output(graph.graph_copy(traced, {}), type_expr=torch.Tensor)
    gm = fx.GraphModule(root, graph, class_name=f"{type(model).__name__}Traced")
    for attr in set(vars(root)) - attrs_before:  # fx stows constant tensors on the root
        if attr.startswith("_tensor_constant"):
            delattr(root, attr)
    gm.train(model.training)
    gm.graph.eliminate_dead_code(is_impure_node=_is_impure)
    _insert_input_guards(gm, examples)
    gm.graph.lint()
    gm.recompile()
    _propagate_and_check(gm, examples, tracer.output_value)
    trace_info = TraceInfo(
        input_names=tuple(input_names),
        inputs={n: _signature(t) for n, t in examples.items()},
        model_class=type(model).__name__,
        decompose_attention=decompose_attention,
        num_decomposed_attention=tracer.num_decomposed_attention,
        frozen_kwargs=dict(frozen),
        example_batch_size=_batch_size(examples),
    )
    # The module hierarchy's classes (ResnetBlock2D, Attention, ...): prepare_fx keeps qualified names but not
    # the classes, and reconstruction partitions blocks by class.
    module_types = {name: type(m) for name, m in model.named_modules()}
    set_graph_info(gm, QDiffGraphInfo(trace=trace_info, module_types=module_types))
    log.info("traced %s: %d nodes, inputs %s", type(model).__name__, len(gm.graph.nodes), input_names)
    return gm


def _bind_inputs(
    model: torch.nn.Module, forward: Any, example_inputs: Mapping[str, Any]
) -> tuple[list[str], dict[str, Any]]:
    """Order the example names as in ``forward`` and collect the frozen keyword arguments."""
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise TypeError(
            "example_inputs must be a non-empty dict of forward argument name -> tensor, e.g. "
            f"{{'sample': x, 'timestep': t}}; received {type(example_inputs).__name__}"
        )
    params = list(inspect.signature(forward).parameters.values())[1:]  # drop self
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    names = [p.name for p in named]
    unknown = [k for k in example_inputs if k not in names]
    if unknown:
        raise ValueError(
            f"example_inputs has {unknown}, which {type(model).__name__}.forward does not take; use names from {names}"
        )
    for key, value in example_inputs.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"example_inputs[{key!r}] must be a torch.Tensor, received "
                f"{type(value).__name__}; pass e.g. torch.full((batch,), t) for a timestep"
            )
    missing = [p.name for p in named if p.default is p.empty and p.name not in example_inputs]
    if missing:
        raise ValueError(f"{type(model).__name__}.forward requires {missing}; add them to example_inputs")
    frozen = {p.name: p.default for p in named if p.name not in example_inputs}
    if "return_dict" in frozen:
        frozen["return_dict"] = False
    return [n for n in names if n in example_inputs], frozen


def _select_sample(out: Any) -> Any:
    """Pick the output sample from what ``forward`` returned (tuple, BaseOutput or tensor)."""
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    elif hasattr(out, "sample") and not isinstance(out, _concrete_tracer.ConcreteProxy):
        out = out.sample
    value = out.value if isinstance(out, _concrete_tracer.ConcreteProxy) else out
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"the model's forward must return a tensor, a tuple starting with one or an object "
            f"with .sample; received {type(value).__name__}"
        )
    if not isinstance(out, _concrete_tracer.ConcreteProxy):
        raise TypeError(
            "the model's output does not depend on example_inputs (it is a constant); check "
            "that example_inputs name the arguments the output is computed from"
        )
    return out


def _is_impure(node: fx.Node) -> bool:
    """Dead-code elimination must keep in-place method calls (``x.add_(y)``) even if unused."""
    if node.op == "call_method" and isinstance(node.target, str):
        return node.target.endswith("_") and not node.target.endswith("__")
    return node.is_impure()


def _signature(t: torch.Tensor) -> tuple[int, torch.dtype, tuple[int, ...]]:
    return (t.ndim, t.dtype, tuple(t.shape[1:]))


def _batch_size(examples: Mapping[str, torch.Tensor]) -> int | None:
    for t in examples.values():
        if t.ndim > 0:
            return int(t.shape[0])
    return None


def _insert_input_guards(gm: fx.GraphModule, examples: Mapping[str, torch.Tensor]) -> None:
    """Route every placeholder through a ``_check_traced_input`` call_function node."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    with gm.graph.inserting_after(placeholders[-1]):
        for ph in reversed(placeholders):
            ndim, dtype, tail = _signature(examples[ph.target])
            guard = gm.graph.create_node(
                "call_function",
                _check_traced_input,
                (ph, str(ph.target), ndim, dtype, tail),
                name=f"{ph.name}_checked",
            )
            guard.meta["is_wrapped"] = True
            ph.replace_all_uses_with(guard, delete_user_cb=lambda user, g=guard: user is not g)


def _propagate_and_check(gm: fx.GraphModule, examples: Mapping[str, torch.Tensor], traced_output: Any) -> None:
    """Record ``tensor_meta`` on every node and check that the generated code replays the trace."""
    with torch.no_grad():
        ShapeProp(gm).propagate(*(t.clone() for t in examples.values()))
        replay = gm(*(t.clone() for t in examples.values()))
    if not isinstance(replay, torch.Tensor) or not torch.allclose(
        replay, traced_output, rtol=1e-5, atol=1e-6, equal_nan=True
    ):
        raise RuntimeError(
            "the traced graph does not reproduce the model's output on the example inputs; the "
            "model likely has a side effect the tracer cannot record (please report it with the "
            "model config)"
        )
