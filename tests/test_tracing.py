"""Tests for qdiff_ao.capture.tracing: diffusers UNets -> flat GraphModule, equal to eager at other batch sizes."""

from __future__ import annotations

import collections
import operator
import pickle
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from torch import fx, nn

import qdiff_ao
from qdiff_ao.capture import _concrete_tracer as _tracer_impl
from qdiff_ao.capture.tracing import trace
from tests.tracing_helpers import (
    ALL_CONFIGS,
    ATOL,
    CHECK_BATCH,
    TRACE_BATCH,
    _build,
    _eager,
    _inputs,
    _targets,
)


@pytest.mark.parametrize("decompose", [True, False], ids=["decomposed", "sdpa_node"])
@pytest.mark.parametrize("processor", ["sdpa", "classic"])
@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_trace_equals_eager_at_another_batch_size(name: str, processor: str, decompose: bool) -> None:
    unet, num_attn = _build(name, processor)
    gm = trace(unet, _inputs(name, TRACE_BATCH, seed=1), decompose_attention=decompose)
    new = _inputs(name, CHECK_BATCH, seed=2)
    with torch.no_grad():
        out = gm(**new)
    ref = _eager(unet, new)
    assert isinstance(out, torch.Tensor) and out.shape == ref.shape
    assert (out - ref).abs().max().item() <= ATOL

    counts = _targets(gm)
    assert num_attn > 0
    if processor == "classic":  # baddbmm -> softmax -> bmm, recorded as the processor calls them
        assert counts[torch.baddbmm] == counts[torch.bmm] == counts["softmax"] == num_attn
        assert counts[F.scaled_dot_product_attention] == 0
    elif decompose:
        assert counts[F.scaled_dot_product_attention] == 0
        assert counts[torch.softmax] == num_attn and counts[torch.matmul] == 2 * num_attn
        assert qdiff_ao.graph_info(gm).trace.num_decomposed_attention == num_attn
    else:
        assert counts[F.scaled_dot_product_attention] == num_attn
        assert counts[torch.softmax] == counts[torch.matmul] == 0


class _ShapeDriven(nn.Module):
    """Python control flow on shapes, varargs factories, an in-place op and a numpy constant.

    x ─► (len(x.shape) == 4 → x * 2) ─► + zeros(b, c, 1, 1) ─► add_(1) ─► y[:, :1] = ... ─► / np.float64(2)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import numpy as np

        if len(x.shape) == 4 and x.shape[1] == 3:
            x = x * 2
        b, c, h, w = x.shape
        assert h == w, "square inputs only"
        y = x + torch.zeros(b, c, 1, 1) + torch.ones(b, 1, h, 1, dtype=x.dtype)
        y.add_(1)  # result unused: dead-code elimination must keep it
        y[:, :1] = y[:, :1] * 0.5  # item assignment is recorded in place
        if torch.is_tensor(y):
            y = y / np.float64(2.0)
        return y.reshape(b, -1)[:, : c * h * w]


def test_generic_module_shape_control_flow_factories_inplace() -> None:
    gm = trace(_ShapeDriven(), {"x": torch.randn(2, 3, 4, 4)})
    x = torch.randn(5, 3, 4, 4)
    assert torch.equal(gm(x), _ShapeDriven()(x))
    assert _targets(gm)["add_"] == 1 and _targets(gm)[operator.setitem] == 1
    assert "np." not in gm.code


@pytest.mark.parametrize(
    ("name", "bad", "error", "fragment"),
    [
        ("sample", torch.randn(3, 3, 16), ValueError, "4-d torch.float32 tensor of shape (batch, 3, 16, 16)"),
        ("sample", torch.randn(3, 3, 16, 8), ValueError, "received a 4-d tensor of shape (3, 3, 16, 8)"),
        ("sample", torch.randn(3, 4, 16, 16), ValueError, "only dim 0, the batch, may change"),
        ("sample", torch.randn(3, 3, 16, 16, dtype=torch.float64), TypeError, "received dtype torch.float64"),
        ("timestep", torch.randint(0, 9, (3, 1)), ValueError, "1-d torch.int64 tensor of shape (batch,)"),
        ("timestep", torch.randint(0, 9, (3,)).float(), TypeError, "received dtype torch.float32"),
        ("timestep", 10, TypeError, "received int"),
    ],
)
def test_guard_refuses_other_rank_dtype_or_shape(name: str, bad: Any, error: type, fragment: str) -> None:
    unet, _ = _build("down_attn")
    gm = trace(unet, _inputs("down_attn", 1, seed=1))
    inputs: dict[str, Any] = _inputs("down_attn", 3, seed=2)
    inputs[name] = bad
    with pytest.raises(error) as info:
        gm(**inputs)
    message = str(info.value)
    assert f"argument {name!r}" in message and fragment in message
    if error is ValueError:
        assert "re-trace with an example of the new shape" in message


def test_timestep_of_length_batch_or_one_is_accepted() -> None:
    unet, _ = _build("cross_attn_cond")
    gm = trace(unet, _inputs("cross_attn_cond", 1, seed=1))
    new = _inputs("cross_attn_cond", 3, seed=2)
    for t in (new["timestep"], new["timestep"][:1]):
        new["timestep"] = t
        assert (gm(**new) - _eager(unet, new)).abs().max().item() <= ATOL


def test_metadata_names_and_input_order() -> None:
    unet, _ = _build("cross_attn_cond")
    example = _inputs("cross_attn_cond", 2, seed=1)
    gm = trace(unet, dict(reversed(list(example.items()))))  # dict order must not matter
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["sample", "timestep", "encoder_hidden_states"]
    info = qdiff_ao.graph_info(gm).trace
    assert list(info.input_names) == placeholders and info.model_class == "UNet2DConditionModel"
    assert info.inputs["encoder_hidden_states"] == (3, torch.float32, (7, 32))
    assert info.inputs["timestep"] == (1, torch.int64, ())
    assert info.frozen_kwargs["return_dict"] is False and info.frozen_kwargs["class_labels"] is None
    assert "sample" not in info.frozen_kwargs and info.example_batch_size == 2

    modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"conv_in", "up_blocks.0.resnets.1.conv1", "down_blocks.0.attentions.0.proj_in"} <= modules
    conv = next(n for n in gm.graph.nodes if n.target == "up_blocks.0.resnets.1.conv1")
    stack = [qualname for qualname, _ in conv.meta["nn_module_stack"].values()]
    assert stack[-2:] == ["up_blocks.0.resnets.1", "up_blocks.0.resnets.1.conv1"]
    out_meta = next(n for n in gm.graph.nodes if n.op == "output").args[0].meta["tensor_meta"]
    assert tuple(out_meta.shape) == (2, 4, 16, 16) and out_meta.dtype == torch.float32
    tensor_nodes = [n for n in gm.graph.nodes if n.op == "call_module" or n.target is torch.softmax]
    assert tensor_nodes and all(n.meta["tensor_meta"].dtype == torch.float32 for n in tensor_nodes)


def test_copy_protects_the_model_and_copy_false_shares_it() -> None:
    unet, _ = _build("down_attn")
    example = _inputs("down_attn", 1, seed=1)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    copied = trace(unet, example, copy=True)
    with torch.no_grad():
        copied.get_submodule("conv_in").weight.zero_()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())

    shared = trace(unet, example, copy=False)
    assert shared.get_submodule("conv_in").weight is unet.conv_in.weight
    assert not [a for a in vars(unet) if a.startswith("_tensor_constant")]  # constants live on the GraphModule


def test_graph_module_deepcopies_and_pickles() -> None:
    import copy

    unet, _ = _build("down_attn")
    gm = trace(unet, _inputs("down_attn", 1, seed=1))
    new = _inputs("down_attn", 2, seed=2)
    expected = gm(**new)
    for clone in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert torch.equal(clone(**new), expected)
        with pytest.raises(ValueError, match="re-trace with an example of the new shape"):
            clone(torch.randn(2, 3, 8, 8), new["timestep"])


class _Raises(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_tensor(x) and x.shape[0] > 0:
            raise RuntimeError("boom")
        return x


def test_torch_globals_restored_after_success_and_failure() -> None:
    originals = {n: getattr(torch, n) for n in ("is_tensor", "empty", "zeros", "ones", "rand", "randn")}
    trace(_ShapeDriven(), {"x": torch.randn(1, 3, 4, 4)})
    with pytest.raises(RuntimeError, match="boom"):
        trace(_Raises(), {"x": torch.randn(1, 3)})
    assert {n: getattr(torch, n) for n in originals} == originals
    assert _tracer_impl._patch_depth == 0


def test_trace_argument_errors() -> None:
    unet, _ = _build("cross_attn_cond")
    example = _inputs("cross_attn_cond", 1, seed=1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        trace(lambda x: x, example)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not take"):
        trace(unet, {**example, "latents": example["sample"]})
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        trace(unet, {k: v for k, v in example.items() if k != "encoder_hidden_states"})
    with pytest.raises(TypeError, match="torch.full"):
        trace(unet, {**example, "timestep": 10})
    with pytest.raises(TypeError, match="non-empty dict"):
        trace(unet, {})


def _disable_non_float_nodes(gm: fx.GraphModule, mapping: Any) -> int:
    """The default x86 mapping puts HistogramObservers on int64 timestep nodes (histc fails on Long):
    turn quantization off for every function/method node whose traced output is not floating point."""
    order: collections.Counter = collections.Counter()
    disabled = 0
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            index = order[node.target]
            order[node.target] += 1
            meta = node.meta.get("tensor_meta")
            if meta is not None and hasattr(meta, "dtype") and not meta.dtype.is_floating_point:
                mapping.set_module_name_object_type_order("", node.target, index, None)
                disabled += 1
    return disabled


def test_prepare_fx_calibrate_convert_smoke() -> None:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    name = "down_attn"  # UNet2DModel: its int64 `timestep * ones(batch)` trips the default mapping

    unet, _ = _build(name)
    example = _inputs(name, 2, seed=1)
    gm = trace(unet, example)
    mapping = get_default_qconfig_mapping("x86")
    assert _disable_non_float_nodes(gm, mapping) >= 1  # timestep * ones(batch) and friends
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(gm, mapping, tuple(example.values()))
        assert _targets(prepared)[torch.softmax] > 0 and _targets(prepared)[torch.matmul] > 0
        with torch.no_grad():
            prepared(**example)
            quantized = convert_fx(prepared)
            new = _inputs(name, 3, seed=2)
            out = quantized(**new)
    assert out.shape == _eager(unet, new).shape and torch.isfinite(out).all()
    assert any(n.target is torch.quantize_per_tensor for n in quantized.graph.nodes)
    bad = {**new, "sample": new["sample"][..., :8]}
    with pytest.raises(ValueError, match="re-trace with an example of the new shape"):
        prepared(**bad)
    with pytest.raises(ValueError, match="argument 'sample'"):
        quantized(**bad)


@pytest.mark.slow
def test_sd14_unet_config_trace_equals_eager() -> None:
    """Full SD-1.4 UNet2DConditionModel config (random weights) on a 32x32 latent at batch 1."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768,
        attention_head_dim=8,
        norm_num_groups=32,
    ).eval()
    g = torch.Generator().manual_seed(0)
    example = {
        "sample": torch.randn(1, 4, 32, 32, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 77, 768, generator=g),
    }
    gm = trace(unet, example, copy=False)  # the UNet is 3.4 GB in fp32: don't hold two
    assert _targets(gm)[torch.softmax] == 32  # 16 transformer blocks x (self + cross attention)
    new = {
        "sample": torch.randn(1, 4, 32, 32, generator=g),
        "timestep": torch.tensor([21]),
        "encoder_hidden_states": torch.randn(1, 77, 768, generator=g),
    }
    with torch.no_grad():
        out = gm(**new)
    assert (out - _eager(unet, new)).abs().max().item() <= ATOL
