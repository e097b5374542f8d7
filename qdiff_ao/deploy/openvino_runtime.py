"""Run a converted UNet graph on OpenVINO's CPU runtime (optional extra: ``pip install 'qdiff_ao[openvino]'``).

    converted graph ──fake_quant_view──► Q/DQ float graph ──export_onnx──► ONNX ──openvino──► compiled model
    (fbgemm kernels)                     (the simulation)                  (QuantizeLinear /      (INT8 convs and
                                                                            DequantizeLinear)      matmuls)

OpenVINO's low-precision transformations fuse each DequantizeLinear -> Conv/MatMul -> QuantizeLinear chain into
an integer kernel; what stays between quantizers (GroupNorm, SiLU, softmax, the time embedding) runs in float32.
The numbers are ours: the same integer weights (4-bit codes inside int8), the same activation scales and zero
points, so the compiled model computes the fake-quant simulation up to kernel rounding (checked against it on
compile). :meth:`OpenVINOGraph.runtime_precisions` reads back, from OpenVINO's executed graph, which layers run
in which precision.

Numerics settings (why): ``INFERENCE_PRECISION_HINT=f32`` (on CPUs with BF16 units OpenVINO would otherwise run
the float layers in bfloat16, which the calibration never saw) and ``DYNAMIC_QUANTIZATION_GROUP_SIZE=0`` (no
runtime quantization of the layers we keep in float).

Shapes: the model is compiled once per batch size seen (static shapes are what OpenVINO's CPU plugin runs
fastest; compiling takes a fraction of a second to a few seconds), up to ``max_shapes`` batch sizes.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import fx

from qdiff_ao.deploy.onnx.export import export_onnx

__all__ = ["OpenVINOGraph", "OpenVINOModel", "openvino_available"]

logger = logging.getLogger(__name__)

_NUMERICS = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}
_INT8 = ("i8", "u8")


def openvino_available() -> bool:
    """True when the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as err:
        raise ImportError("the OpenVINO backend needs the openvino package: pip install 'qdiff_ao[openvino]' "
                          "(or use backend='torch', the fbgemm kernels)") from err
    return openvino


class OpenVINOModel:
    """An OpenVINO model compiled for the CPU once per input shape; called with keyword inputs (numpy-convertible
    tensors), returns the first output as a float tensor.

    Args:
        model: an ``openvino.Model`` (read from ONNX, or NNCF's output).
        threads: OpenVINO inference threads (default: ``torch.get_num_threads()``, so both engines use the same
            cores).
        max_shapes: input shapes kept compiled at once (the oldest is dropped beyond it).
    """

    def __init__(self, model: Any, *, threads: int | None = None, max_shapes: int = 4) -> None:
        self._core = _import_openvino().Core()
        self.threads = int(threads) if threads is not None else torch.get_num_threads()
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.max_shapes = max_shapes
        self._model = model
        self.input_names = [port.get_any_name() for port in model.inputs]
        self._compiled: dict[tuple[tuple[int, ...], ...], Any] = {}

    def _properties(self) -> dict[str, str]:
        return {**_NUMERICS, "INFERENCE_NUM_THREADS": str(self.threads), "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": "1"}

    def _request(self, inputs: Mapping[str, torch.Tensor]) -> Any:
        key = tuple(tuple(inputs[name].shape) for name in self.input_names)
        request = self._compiled.get(key)
        if request is None:
            if len(self._compiled) >= self.max_shapes:
                self._compiled.pop(next(iter(self._compiled)))
            model = self._model.clone()
            model.reshape({name: list(shape) for name, shape in zip(self.input_names, key)})
            compiled = self._core.compile_model(model, "CPU", self._properties())
            request = compiled.create_infer_request()
            self._compiled[key] = request
            logger.info("OpenVINO compiled the UNet for input shapes %s", key)
        return request

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise TypeError(f"the compiled UNet takes inputs {self.input_names}; missing {missing}")
        request = self._request(inputs)
        arrays = {name: inputs[name].detach().contiguous().numpy() for name in self.input_names}
        request.infer(arrays)
        # The request reuses its output buffer on the next call: copy it out.
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    def runtime_precisions(self, example_inputs: Mapping[str, torch.Tensor]) -> Counter[tuple[str, str]]:
        """``Counter{(layer type, runtime precision): count}`` of the graph OpenVINO executes for these inputs'
        shapes, e.g. ``("Convolution", "u8")`` for an integer conv and ``("Convolution", "f32")`` for a float one
        (read from the executed model's runtime info: ``layerType`` / ``runtimePrecision``)."""
        runtime = self._request(example_inputs).get_compiled_model().get_runtime_model()
        found: Counter[tuple[str, str]] = Counter()
        for op in runtime.get_ordered_ops():
            info = op.get_rt_info()
            found[(str(info["layerType"].astype(str)), str(info["runtimePrecision"].astype(str)))] += 1
        return found

    def int8_layers(self, example_inputs: Mapping[str, torch.Tensor]) -> dict[str, int]:
        """``{"Convolution": n, "MatMul": m, ...}``: executed layers of each type that run in an 8-bit precision
        (the integer kernels), from :meth:`runtime_precisions`."""
        counts: Counter[str] = Counter()
        for (kind, precision), n in self.runtime_precisions(example_inputs).items():
            if precision in _INT8:
                counts[kind] += n
        return dict(counts)


class OpenVINOGraph(OpenVINOModel):
    """A converted graph compiled by OpenVINO; called like the graph (keyword inputs), returns a float tensor.

    Args:
        converted: a converted GraphModule (``qdiff_ao.convert``, ``QuantizedUNet.graph_module``). A graph with
            timestep groups needs ``timestep_group``.
        example_inputs: one batch of graph inputs by name (any batch size), for the ONNX export.
        threads, max_shapes: see :class:`OpenVINOModel`.
        timestep_group: the timestep group whose activation qparams to compile (see
            :func:`qdiff_ao.deploy.onnx.export.export_onnx`).

    Raises:
        ImportError: openvino is not installed.
    """

    def __init__(
        self,
        converted: fx.GraphModule,
        example_inputs: Mapping[str, torch.Tensor],
        *,
        threads: int | None = None,
        timestep_group: int | None = None,
        max_shapes: int = 4,
    ) -> None:
        core = _import_openvino().Core()
        with tempfile.TemporaryDirectory(prefix="qdiff_ao_ov_") as tmp:
            path = Path(tmp) / "unet.onnx"
            # QuantizedUNet runs a float tail's rows on its own view, never here
            self.export_report = export_onnx(converted, path, example_inputs, timestep_group=timestep_group,
                                             ignore_float_tail=True)
            model = core.read_model(os.fspath(path))  # weights are read into memory here
        super().__init__(model, threads=threads, max_shapes=max_shapes)
