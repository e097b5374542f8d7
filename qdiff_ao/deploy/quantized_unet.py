"""``QuantizedUNet``: a lowered GraphModule behind the diffusers UNet call signature, for pipelines.

    pipe = DDIMPipeline(unet=QuantizedUNet(quantized_gm, like=unet), scheduler=scheduler)
    images = pipe(batch_size=4).images

The wrapper normalises what diffusers pipelines pass (timestep as int, float, 0-d or 1-d tensor; return_dict)
into what the traced graph takes (a 1-d timestep of the traced dtype, one entry per sample) and wraps the output
in ``UNet2DOutput`` / ``UNet2DConditionOutput``. :meth:`QuantizedUNet.optimize_for_inference` swaps the
GraphModule's Python execution for a frozen TorchScript module running the same kernels (bit-identical output),
or (``backend="openvino"``) for OpenVINO's INT8 runtime on the graph's Q/DQ form.

With timestep groups (``passes.choose_timestep_groups``) the wrapper holds one graph per kept group, sharing the
packed weights (``deploy.timestep_dispatch``), and runs each batch on the graph of its timestep's group; a batch
whose rows fall into different groups is split by group and put back in order (UNet rows are independent).
With a float tail (``passes.choose_float_tail``) the last timesteps run on the weights-only view of the graph
(``deploy.float_tail_dispatch``).
"""

from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any

import torch
from diffusers.models.modeling_utils import ModelMixin
from torch import fx, nn

from qdiff_ao.calibration.distributed import run_on_main_process
from qdiff_ao.capture.input_guards import check_graph_inputs, example_inputs_from_guards, traced_input_guards
from qdiff_ao.capture.row_parts import run_by_part
from qdiff_ao.deploy.checkpoint.archive import load_graph, save_graph
from qdiff_ao.deploy.checkpoint.loader_options import check_loader_options
from qdiff_ao.deploy.float_tail_dispatch import FloatTailDispatch
from qdiff_ao.deploy.freezing import freeze_graph
from qdiff_ao.deploy.identity_ops import without_identity_arithmetic
from qdiff_ao.deploy.integer_attention import lower_integer_attention
from qdiff_ao.deploy.openvino_runtime import OpenVINOGraph
from qdiff_ao.deploy.timestep_dispatch import group_graph, lowered_groups_of, without_groups

__all__ = ["QuantizedUNet", "check_loader_options", "graph_input_spec", "load", "save"]

_BACKENDS = ("torch", "openvino")
_MAX_INT_TIMESTEP = 2**53  # beyond this a float timestep no longer holds an exact integer


def graph_input_spec(gm: fx.GraphModule) -> dict[str, tuple[int, torch.dtype]]:
    """{input name: (rank, dtype)} as traced, read from the input guard nodes of ``qdiff_ao.trace``."""
    spec = {name: (ndim, dtype) for name, (ndim, dtype, _) in traced_input_guards(gm).items()}
    if not spec:
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                spec[str(node.target)] = (-1, torch.float32)
    return spec


def _check_on_cpu(**inputs: Any) -> None:
    """Refuse inputs on another device: the integer kernels run on the CPU, and a CUDA tensor would otherwise
    fail deep inside a quantized op (or, for ``quantize_per_tensor``, run there and fail one op later)."""
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            raise ValueError(
                f"QuantizedUNet runs INT8 kernels on the CPU, but {name} is on {value.device}. Run the pipeline "
                "on the CPU (pipe.to('cpu'); a GPU can still be used to quantize, see README) or pass CPU tensors"
            )


class QuantizedUNet(ModelMixin):
    """Drop-in UNet for diffusers pipelines around a (quantized) traced GraphModule.

    A ``diffusers.ModelMixin`` so that diffusers' pipeline loader and saver treat it as a model component:
    a pipeline folder whose ``model_index.json`` says ``"unet": ["qdiff_ao", "QuantizedUNet"]`` loads with
    ``DiffusionPipeline.from_pretrained`` (diffusers finds the load method through ``qdiff_ao.ModelMixin``), and
    ``pipe.save_pretrained`` writes this checkpoint into ``unet/``.

    Args:
        graph_module: from ``qdiff_ao.convert`` (or a user's convert_fx on a ``qdiff_ao.trace`` graph).
        like: the original diffusers UNet, whose ``config`` and output type are copied; or None with
            ``config`` given.
        config: the diffusers UNet config (a dict), when ``like`` is not at hand (checkpoint loading).
        conditional: output ``UNet2DConditionOutput`` (True) or ``UNet2DOutput``; inferred from ``like``.
    """

    quantization_info: dict[str, Any]  # set by qdiff_ao.quantize (absent on a wrapper built otherwise)
    check_finite: bool = True
    """Refuse NaN/Inf in ``sample`` / ``encoder_hidden_states`` (ValueError); set False to skip the check."""

    def __init__(
        self,
        graph_module: fx.GraphModule,
        like: nn.Module | None = None,
        *,
        config: Any = None,
        conditional: bool | None = None,
    ) -> None:
        super().__init__()
        if like is None and config is None:
            raise ValueError("QuantizedUNet needs the original UNet (like=unet) or its config (config=...)")
        self.graph_module = graph_module
        self._spec = graph_input_spec(graph_module)
        self._config = config if config is not None else like.config  # type: ignore[union-attr]
        if conditional is None:
            conditional = "encoder_hidden_states" in self._spec
        self.conditional = conditional
        # Optimized runners, one per graph (frozen TorchScript or OpenVINO); a list keeps them out of the module
        # tree and the state_dict.
        self._frozen: list[Any] = []
        self._backend = "fx"
        self._guards: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        # Timestep groups: graph k of self._graphs runs group g when self._graph_of_group[g] == k (0: the
        # single-grid graph, for groups that kept it). Plain lists stay out of the module tree and state_dict.
        self._groups = lowered_groups_of(graph_module)
        self._graphs: list[fx.GraphModule] = [graph_module]
        self._graph_of_group = torch.zeros(1, dtype=torch.long)
        if self._groups is not None and self._groups.lowered is not None:
            index = []
            for entries in self._groups.lowered:
                if entries:
                    self._graphs.append(group_graph(graph_module, entries))
                index.append(len(self._graphs) - 1 if entries else 0)
            self._graph_of_group = torch.tensor(index, dtype=torch.long)
        self._graph_index: list[int] = self._graph_of_group.tolist()
        self._tail = FloatTailDispatch.of(graph_module)  # None without a float tail

    @property
    def timestep_group_boundaries(self) -> tuple[float, ...]:
        """Boundaries of the timestep groups with their own activation qparams (``()``: one group)."""
        return tuple(self._groups.boundaries) if self._groups is not None else ()

    @property
    def float_tail_below(self) -> float | None:
        """Timesteps ``t <=`` this run with float activations (the float tail); None: no tail."""
        return self._tail.tail.below if self._tail is not None else None

    @property
    def config(self) -> Any:
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        for t in self.graph_module.state_dict().values():
            if isinstance(t, torch.Tensor):
                return t.device
        return torch.device("cpu")

    # ModelMixin's save/load keywords (variants, shards, hub pushes) do not apply to this checkpoint format;
    # diffusers' pipeline saver passes a component only the keywords its save_pretrained signature names.
    def save_pretrained(  # type: ignore[override]
        self, path: str | os.PathLike[str], *, overwrite: bool = False
    ) -> Path:
        """Write a compressed checkpoint directory (``config.json`` + ``model.safetensors``; see
        :func:`qdiff_ao.deploy.checkpoint.save_graph`) and return its absolute path.

        Under a torch.distributed process group only rank 0 writes (the other ranks return the path without
        writing), so every rank may call it, or only rank 0.
        """
        written: list[Path] = []
        run_on_main_process(lambda: written.append(save_graph(self.graph_module, path, unet_config=self.config,
                                                              overwrite=overwrite)))
        return written[0] if written else Path(path).expanduser().absolute()

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls, path: str | os.PathLike[str], **loader_options: Any
    ) -> QuantizedUNet:
        """Load a checkpoint written by :meth:`save_pretrained`, in eval mode on the CPU (usable as ``pipe.unet``).

        ``loader_options`` are the keywords diffusers' pipeline loader passes to every model component
        (``torch_dtype``, ``device_map``, ``variant``, ...); each is accepted only at a value this CPU integer
        checkpoint can honour (see :func:`check_loader_options`).

        Raises:
            CheckpointError: see :func:`qdiff_ao.deploy.checkpoint.load_graph`.
            TypeError, ValueError: a loader option this checkpoint cannot honour.
        """
        check_loader_options(loader_options)
        gm, config = load_graph(path)
        return cls(gm, config=config).eval()

    @property
    def optimized(self) -> bool:
        """True after :meth:`optimize_for_inference`."""
        return bool(self._frozen)

    @property
    def backend(self) -> str:
        """What runs the graph: ``"fx"`` (the GraphModule), ``"torch"`` (frozen TorchScript) or ``"openvino"``."""
        return self._backend

    def optimize_for_inference(
        self,
        example_inputs: dict[str, torch.Tensor] | None = None,
        *,
        backend: str = "torch",
        threads: int | None = None,
        integer_attention: bool = True,
    ) -> QuantizedUNet:
        """Run the lowered graph without per-node Python dispatch; returns self.

        ``backend="torch"``: a frozen TorchScript module with the same ``quantized::*`` kernels and packed weights
        (outputs bit-identical to the graph it froze, checked on the example; with ``integer_attention`` that graph
        multiplies attention's codes in int32: f32 rounding, and a probability on a rounding tie may move one code).
        ``backend="openvino"``: the graph's Q/DQ form compiled by OpenVINO's CPU runtime (``pip install
        'qdiff_ao[openvino]'``; see :mod:`qdiff_ao.deploy.openvino_runtime`), the same integer weights and qparams
        on OpenVINO's INT8 kernels (outputs equal the fake-quant simulation up to kernel rounding, not
        bit-identical to fbgemm). Either way inputs are still checked against the traced signature, any batch
        size runs, and ``save_pretrained`` writes the same checkpoint.

        Args:
            example_inputs: graph inputs for tracing / export (default: one random sample at timestep 500, built
                from the traced signature).
            backend: ``"torch"`` or ``"openvino"``.
            threads: OpenVINO inference threads (default: ``torch.get_num_threads()``); torch backend: ignored.
            integer_attention: torch backend: run 8-bit quantized attention on integer matmuls
                (:func:`~qdiff_ao.deploy.integer_attention.lower_integer_attention`; the same numbers up to f32
                rounding of the sums). False keeps convert_fx's f32 matmuls on grid values. OpenVINO: ignored.

        Raises:
            ValueError: an unknown backend.
            ImportError: ``backend="openvino"`` without the openvino package.
        """
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        guards = traced_input_guards(self.graph_module)
        if example_inputs is None:
            example_inputs = example_inputs_from_guards(guards)
        if backend == "openvino":
            # Each graph holds one group's qparams; exported on its own, it must not carry the group table.
            graphs = [without_groups(gm) for gm in self._graphs] if self._groups is not None else self._graphs
            self._frozen = [OpenVINOGraph(gm, example_inputs, threads=threads) for gm in graphs]
        else:
            graphs = [lower_integer_attention(gm) for gm in self._graphs] if integer_attention else self._graphs
            graphs = [without_identity_arithmetic(gm, example_inputs) for gm in graphs]  # exact: x / 1.0 is x
            self._frozen = [freeze_graph(gm, example_inputs) for gm in graphs]
        self._guards = guards
        self._backend = backend
        return self

    def to(self, *args: Any, **kwargs: Any) -> QuantizedUNet:  # type: ignore[override]
        dtype = kwargs.get("dtype") or next((a for a in args if isinstance(a, torch.dtype)), None)
        device = kwargs.get("device") or next((a for a in args if isinstance(a, (str, torch.device))), None)
        if dtype is not None and dtype != torch.float32:
            raise TypeError(f"QuantizedUNet runs integer kernels with float32 I/O; it cannot be cast to {dtype}")
        if device is not None and torch.device(device).type != "cpu":
            raise RuntimeError(
                f"QuantizedUNet's fbgemm/x86 INT8 kernels run on the CPU only; cannot move it to {device}"
            )
        return self

    def half(self) -> QuantizedUNet:
        return self.to(torch.float16)

    def bfloat16(self) -> QuantizedUNet:
        return self.to(torch.bfloat16)

    def double(self) -> QuantizedUNet:
        return self.to(torch.float64)

    def train(self, mode: bool = True) -> QuantizedUNet:
        if mode:
            raise RuntimeError(
                "QuantizedUNet is an inference model (integer weights, frozen qparams) and cannot be trained; "
                "fine-tune the float UNet and quantize again"
            )
        return super().train(False)

    def _timestep(self, timestep: Any, batch: int) -> torch.Tensor:
        ndim, dtype = self._spec.get("timestep", (1, torch.int64))
        t = torch.as_tensor(timestep)
        if t.dtype == torch.bool or t.is_complex():
            raise TypeError(f"timestep must be an integer or real number, got a {t.dtype} value {t.tolist()}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"timestep must be finite, got {t.tolist()}")
        if t.is_floating_point() and not dtype.is_floating_point and bool((t.abs() > _MAX_INT_TIMESTEP).any()):
            raise ValueError(f"timestep {t.tolist()} is outside the integer range the UNet was traced with "
                             f"(|t| <= {_MAX_INT_TIMESTEP})")
        if t.dim() > 1 or (t.dim() == 1 and t.numel() not in (1, batch)):
            raise ValueError(
                f"timestep must be a number, a 0-d tensor or a 1-d tensor of length 1 or {batch} (the batch), "
                f"got shape {tuple(t.shape)}"
            )
        if t.is_floating_point() and not dtype.is_floating_point and bool((t != t.round()).any()):
            raise ValueError(
                f"the UNet was traced with integer timesteps ({dtype}) but received fractional timestep(s) "
                f"{t.tolist()}; trace with a float timestep for this scheduler"
            )
        t = t.to(dtype).reshape(-1)
        return t.expand(batch).contiguous() if ndim == 1 else t.reshape(())

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        for name, value in (("encoder_hidden_states", encoder_hidden_states), ("class_labels", class_labels)):
            if value is not None and name not in self._spec:
                raise TypeError(f"this UNet was traced without {name}, so it would ignore it; pass None (an "
                                f"unconditional UNet) or quantize a UNet traced with {name}")
        _check_on_cpu(sample=sample, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                      class_labels=class_labels)
        if self.check_finite:
            for name, value in (("sample", sample), ("encoder_hidden_states", encoder_hidden_states)):
                # NaN and Inf propagate into the sum, so a finite sum proves a finite tensor with one cheap
                # reduction; a non-finite sum (or an overflowing one) falls back to the element-wise check.
                if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(
                        torch.isfinite(value.sum())) and not bool(torch.isfinite(value).all()):
                    raise ValueError(
                        f"{name} holds NaN or Inf values; the integer kernels would turn them into finite numbers "
                        "(the float UNet returns NaN). Fix the input, or set QuantizedUNet.check_finite = False "
                        "to skip this check"
                    )
        unsupported = {k for k, v in kwargs.items() if v is not None and k not in ("cross_attention_kwargs",)}
        if unsupported or kwargs.get("cross_attention_kwargs"):
            raise TypeError(
                f"QuantizedUNet was traced without {sorted(unsupported) or ['cross_attention_kwargs']}; these "
                "arguments were frozen at trace time. Re-trace the float UNet if you need them"
            )
        inputs: dict[str, Any] = {"sample": sample, "timestep": self._timestep(timestep, sample.shape[0])}
        if "encoder_hidden_states" in self._spec:
            if encoder_hidden_states is None:
                raise TypeError("this UNet is conditional: pass encoder_hidden_states")
            inputs["encoder_hidden_states"] = encoder_hidden_states
        if "class_labels" in self._spec:
            if class_labels is None:
                raise TypeError("this UNet was traced with class_labels: pass class_labels")
            inputs["class_labels"] = class_labels
        graph_inputs = {k: inputs[k] for k in self._spec}
        if self._frozen:
            # The frozen module ran the graph's input guards once, at trace time: check every call here.
            check_graph_inputs(self._guards, graph_inputs)
        out = self._run(graph_inputs)
        if not return_dict:
            return (out,)
        if self.conditional:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=out)
        from diffusers.models.unets.unet_2d import UNet2DOutput

        return UNet2DOutput(sample=out)

    def _run(self, graph_inputs: dict[str, Any]) -> Any:
        """The float tail's view on its rows, the integer graphs on the others."""
        return self._tail.run(graph_inputs, self._run_integer) if self._tail else self._run_integer(graph_inputs)

    def _run_integer(self, graph_inputs: dict[str, Any]) -> Any:
        """The graph (frozen or not) of each row's timestep group on its rows."""
        runners: list[Any] = self._frozen or self._graphs
        if self._groups is None:
            return runners[0](**graph_inputs)
        t = graph_inputs["timestep"]
        first = t.reshape(-1)[0]
        if t.numel() == 1 or bool((t == first).all()):  # one timestep (every sampler step): no tensor dispatch
            group = bisect.bisect_right(self._groups.boundaries, float(first))
            return runners[self._graph_index[group]](**graph_inputs)
        which = self._graph_of_group[self._groups.group_of(t)]
        return run_by_part(graph_inputs, which, lambda k, sub: runners[k](**sub))


def save(
    model: QuantizedUNet | fx.GraphModule,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    unet_config: Any = None,
) -> Path:
    """Alias of :meth:`QuantizedUNet.save_pretrained`; a bare converted GraphModule needs ``unet_config``.

    Raises:
        TypeError: ``model`` is neither a QuantizedUNet nor a GraphModule.
        ValueError: a bare GraphModule without ``unet_config``, or see :func:`~qdiff_ao.deploy.checkpoint.save_graph`.
    """
    if isinstance(model, QuantizedUNet):
        return save_graph(model.graph_module, path, overwrite=overwrite,
                          unet_config=unet_config if unet_config is not None else model.config)
    if not isinstance(model, fx.GraphModule):
        raise TypeError(f"save takes a QuantizedUNet or a converted fx.GraphModule, got {type(model).__name__}")
    if unet_config is None:
        raise ValueError("save needs the diffusers UNet config for a bare GraphModule: pass unet_config=unet.config")
    return save_graph(model, path, unet_config=unet_config, overwrite=overwrite)


def load(path: str | os.PathLike[str]) -> QuantizedUNet:
    """Alias of :meth:`QuantizedUNet.from_pretrained`."""
    return QuantizedUNet.from_pretrained(path)


# The public name, not the defining module: diffusers' pipeline saver writes a custom component's module into
# model_index.json, and "qdiff_ao" stays valid however the package's files move (as pickles do).
QuantizedUNet.__module__ = "qdiff_ao"
