"""cuDNN lowering plan: which layers qualify for torch's QuantizedCUDA kernels and why the others stay float.

Every rule of ``qdiff_ao.backends.cudnn`` is tested here on CPU in both directions (a layer that meets it, a layer
that breaks it); where torch itself can be asked on CPU (dispatcher registrations, torch.ao's quantized Conv2d),
the rule's source is checked too. The kernels need a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
import torch.ao.nn.quantized as nnq
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import qdiff_ao
from qdiff_ao._compat import convert_to_reference_fx
from qdiff_ao.backends import CudnnBackend, LayerDecision, plan_cudnn_lowering
from qdiff_ao.capture.graph_state import update_graph_info
from qdiff_ao.deploy.layer_check import check_lowered_layers
from qdiff_ao.quantizers.simulation import build_simulation
from tests.unet_factory import build_unet, unet_inputs

CUDNN = CudnnBackend()

CUDNN_CFG = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8, act_symmetric=True, weight_granularity="per_tensor",
                                 timestep_aware=False)


class Zoo(nn.Module):
    """One layer per rule (or per supported case), all fed by x (B, 8, H, W); the outputs are reduced and summed."""

    def __init__(self) -> None:
        super().__init__()
        self.ok = nn.Conv2d(8, 8, 3, padding=1)
        self.odd = nn.Conv2d(8, 6, 1)  # channels not multiples of 4: torch pads them
        self.strided = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.same = nn.Conv2d(8, 8, 3, padding="same")
        self.valid = nn.Conv2d(8, 8, 1, padding="valid")
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.c1d = nn.Conv1d(8, 8, 3, padding=1)
        self.c3d = nn.Conv3d(8, 8, 1)
        self.fc_ok = nn.Linear(8, 16, bias=False)
        self.fc_bias = nn.Linear(8, 16)
        self.fc_odd = nn.Linear(8, 10, bias=False)
        self.fc_3d = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        convs = (self.ok, self.odd, self.strided, self.grouped, self.dilated, self.same, self.valid, self.reflect,
                 self.up)
        parts = [m(x).mean() for m in convs]
        parts += [self.c1d(x.flatten(2)).mean(), self.c3d(x.unsqueeze(2)).mean()]
        parts += [self.fc_ok(pooled).mean(), self.fc_bias(pooled).mean(), self.fc_odd(pooled).mean()]
        parts.append(self.fc_3d(x.flatten(2).transpose(1, 2)).mean())
        return torch.stack(parts).sum()


EXPECTED = {  # layer -> (kernel_ok, use_cudnn, phrase of the reason)
    "ok": (True, True, ""),
    "odd": (True, True, ""),
    "strided": (True, True, ""),
    "grouped": (False, False, "limited to groups = 1"),
    "dilated": (False, False, "dilation=(2, 2) (GUESS"),
    "same": (False, False, "padding='same'"),
    "valid": (False, False, "padding='valid'"),
    "reflect": (False, False, "padding_mode='reflect'"),
    "up": (False, False, "transpose = false"),
    "c1d": (True, False, "declares Conv2d and Linear only"),
    "c3d": (False, False, "no QuantizedCUDA quantized::conv3d"),
    "fc_ok": (True, True, ""),
    "fc_bias": (False, False, "nonzero bias: torch's cuDNN quantized::linear drops it (MEASURED"),
    "fc_odd": (False, False, "out_features=10 not a multiple of 4 (GUESS"),
    "fc_3d": (False, False, "3-d input (2, 16, 8)"),
}


def traced_zoo() -> fx.GraphModule:
    gm = fx.symbolic_trace(Zoo().eval())
    ShapeProp(gm).propagate(torch.randn(2, 8, 4, 4))
    return gm


def test_each_rule_decides_its_layer() -> None:
    decisions = {d.name: d for d in plan_cudnn_lowering(traced_zoo(), CUDNN_CFG, log=False)}
    assert set(decisions) == set(EXPECTED)
    for name, (kernel_ok, lowered, phrase) in EXPECTED.items():
        d = decisions[name]
        assert (d.kernel_ok, d.use_cudnn) == (kernel_ok, lowered), d
        if lowered:
            assert d.reasons == ()
        else:
            assert len(d.reasons) == 1 and phrase in d.reasons[0], d.reasons
    ops = {name: d.op for name, d in decisions.items()}
    assert (ops["up"], ops["c1d"], ops["c3d"], ops["fc_ok"]) == ("conv_transpose", "conv1d", "conv3d", "linear")


def test_any_channel_count_qualifies_for_conv() -> None:
    """ConvPrepack.cpp / Conv.cpp pad conv channels to multiples of 4 themselves: 3 -> 5 channels is fine."""
    net = nn.Sequential(nn.Conv2d(3, 5, 3), nn.Conv2d(5, 7, 1)).eval()
    assert all(d.use_cudnn for d in plan_cudnn_lowering(fx.symbolic_trace(net), CUDNN_CFG, log=False))


def test_linear_input_shape_must_be_known() -> None:
    """Without tensor_meta (no ShapeProp / qdiff_ao.trace) the 2-d input rule cannot be checked: linears stay
    float, convs are unaffected."""
    decisions = {d.name: d for d in plan_cudnn_lowering(fx.symbolic_trace(Zoo()), CUDNN_CFG, log=False)}
    assert not decisions["fc_ok"].use_cudnn and "input shape unknown" in decisions["fc_ok"].reasons[0]
    assert decisions["ok"].use_cudnn


@pytest.mark.parametrize("dtype,ok", [(torch.float32, True), (torch.float64, False), (torch.float16, False)])
def test_bias_dtype(dtype: torch.dtype, ok: bool) -> None:
    gm = traced_zoo()
    layer = gm.get_submodule("ok")
    layer.bias = nn.Parameter(layer.bias.detach().to(dtype))
    decision = {d.name: d for d in plan_cudnn_lowering(gm, CUDNN_CFG, log=False)}["ok"]
    assert decision.use_cudnn is ok
    assert ok or f"bias is {dtype} (GUESS" in decision.reasons[0]


def test_linear_with_zero_bias_qualifies() -> None:
    """The linear rule is about the bias's value: an all-zero bias (nothing to drop) is lowered."""
    gm = traced_zoo()
    with torch.no_grad():
        gm.get_submodule("fc_bias").bias.zero_()
    assert {d.name: d for d in plan_cudnn_lowering(gm, CUDNN_CFG, log=False)}["fc_bias"].use_cudnn


@pytest.mark.parametrize(
    "changes,phrases",
    [
        (dict(weight_granularity="per_channel"), ["per-channel weights", "Unsupported qscheme"]),
        (dict(act_symmetric=False), ["affine activations"]),
        (dict(act_bits=None), ["weights-only"]),
    ],
)
def test_config_rules_apply_to_every_layer(changes: dict[str, object], phrases: list[str]) -> None:
    cfg = dataclasses.replace(CUDNN_CFG, **changes)
    for d in plan_cudnn_lowering(traced_zoo(), cfg, log=False):
        assert not d.use_cudnn and not d.kernel_ok
        assert all(any(p in r for r in d.reasons) for p in phrases), d.reasons
    with pytest.raises(ValueError, match=next(iter(changes))):
        CUDNN.qconfig_mapping(cfg, traced_zoo())


def test_one_log_line_per_fallback_layer(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="qdiff_ao.backends.cudnn_rules"):
        plan_cudnn_lowering(traced_zoo(), CUDNN_CFG)
    lines = [r.getMessage() for r in caplog.records if "stays float" in r.getMessage()]
    assert len(lines) == sum(not lowered for _, lowered, _ in EXPECTED.values())
    for name, (_, lowered, phrase) in EXPECTED.items():
        if not lowered:
            assert any(line.startswith(f"cuDNN lowering: {name} (") and phrase in line for line in lines), name
    assert any("4 of 15 conv/linear layers qualify" in r.getMessage() for r in caplog.records)


def test_qconfig_reuses_qdiff_observers_on_signed_int8() -> None:
    """W8A8: full [-128, 127] weights (no x86 reduce_range), qint8 activations with zero point 0; the backend
    config declares exactly Conv2d and Linear with qint8 in / out / weight and float bias."""
    cfg = dataclasses.replace(CUDNN_CFG, weight_bits=8, act_bits=8, running_stat=True, range_method="minmax")
    qconfig = CUDNN.qconfig_mapping(cfg, traced_zoo()).global_qconfig
    act, weight = qconfig.activation(), qconfig.weight()
    assert (act.dtype, act.qscheme, act.quant_min, act.quant_max) == (
        torch.qint8, torch.per_tensor_symmetric, -128, 127)
    assert type(act).__name__ == "EMAMinMaxObserver"  # cfg.running_stat honoured, as in qdiff_ao.qconfig
    assert (weight.dtype, weight.qscheme, weight.quant_min, weight.quant_max) == (
        torch.qint8, torch.per_tensor_symmetric, -128, 127)
    configs = CUDNN.backend_config(cfg).configs
    assert [c.pattern for c in configs] == [nn.Conv2d, nn.Linear]
    for c in configs:
        [dt] = c.dtype_configs
        assert (dt.input_dtype, dt.output_dtype, dt.weight_dtype, dt.bias_dtype) == (
            torch.qint8, torch.qint8, torch.qint8, torch.float)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(8, 8, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def converted_small() -> tuple[fx.GraphModule, list[LayerDecision]]:
    x = torch.randn(2, 4, 6, 6)
    gm = fx.symbolic_trace(Small().eval())
    ShapeProp(gm).propagate(x)
    prepared = qdiff_ao.prepare(gm, CUDNN_CFG, {"x": x}, split=False, backend=CUDNN)
    with torch.no_grad():
        prepared(x)
    lowered = qdiff_ao.convert(prepared)
    return lowered, list(qdiff_ao.graph_info(lowered).cudnn_decisions or ())


@pytest.mark.parametrize(
    "breaks", ["none", "weight_zero_point", "per_channel", "output_zero_point", "input_zero_point"])
def test_plan_reads_quantized_tensors_of_a_converted_graph(breaks: str) -> None:
    """Zero points (weight, input, output) and the weight qscheme are read from the converted modules and quantize
    nodes; the linear's 2-d input rule comes from the decisions CudnnBackend recorded (carried through convert)."""
    lowered, decisions = converted_small()
    assert all(d.use_cudnn for d in decisions)
    conv = lowered.conv
    w = conv.weight().dequantize()
    if breaks == "weight_zero_point":
        conv.set_weight_bias(torch.quantize_per_tensor(w, 0.1, 2, torch.qint8), conv.bias())
    elif breaks == "per_channel":
        qw = torch.quantize_per_channel(w, torch.full((8,), 0.1), torch.zeros(8, dtype=torch.long), 0, torch.qint8)
        conv.set_weight_bias(qw, conv.bias())
    elif breaks == "output_zero_point":
        conv.zero_point = 3
    elif breaks == "input_zero_point":
        lowered.conv_input_zero_point_0 = torch.tensor(5)
    phrase = {"weight_zero_point": "nonzero zero point", "per_channel": "Unsupported qscheme",
              "output_zero_point": "affine activations", "input_zero_point": "affine activations"}.get(breaks)
    plan = {d.name: d for d in plan_cudnn_lowering(lowered, CUDNN_CFG, log=False)}
    assert plan["fc"].use_cudnn
    assert plan["conv"].use_cudnn is (phrase is None)
    assert phrase is None or any(phrase in r for r in plan["conv"].reasons), plan["conv"].reasons
    update_graph_info(lowered, cudnn_decisions=None)
    assert "input shape unknown" in plan_cudnn_lowering(lowered, CUDNN_CFG, log=False)[1].reasons[0]


def test_plan_reads_observers_of_a_prepared_graph() -> None:
    """A graph prepared with qdiff_ao's x86 mapping (uint8 affine activations, per-channel weights) is refused
    for what its observers say, whatever cfg claims."""
    unet = build_unet("attn")
    x86_cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, timestep_aware=False)
    prepared = qdiff_ao.prepare(unet, x86_cfg, unet_inputs("attn", 2))
    decisions = plan_cudnn_lowering(prepared, CUDNN_CFG, log=False)
    assert decisions and not any(d.use_cudnn for d in decisions)
    for d in decisions:
        assert any("torch.quint8" in r for r in d.reasons) and any("per-channel" in r for r in d.reasons)


def test_unet_prepare_convert_keeps_fallback_layers_float() -> None:
    """Tiny UNet: the attention projections (3-d inputs) and the linears with a bias (time embedding) stay float;
    every conv (3-channel conv_in / conv_out and split halves included) gets qint8 symmetric quantizers and
    becomes a torch.ao quantized module; the plan agrees on the traced, prepared and converted graphs."""
    family = "attn"
    unet = build_unet(family)
    prepared = qdiff_ao.prepare(unet, CUDNN_CFG, unet_inputs(family, 2), backend=CUDNN)
    decisions = list(qdiff_ao.graph_info(prepared).cudnn_decisions or ())
    fallback = {d.name for d in decisions if not d.use_cudnn}
    attention = {name for name in fallback if ".attentions." in name}
    assert attention and all(name.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for name in attention)
    assert all(any("3-d input" in r for r in d.reasons) for d in decisions if d.name in attention)
    biased = {d.name for d in decisions if any("nonzero bias" in r for r in d.reasons)}
    assert "time_embedding.linear_1" in biased and fallback == attention | biased
    assert all(d.op == "linear" for d in decisions if d.name in biased)
    assert {"conv_in", "conv_out", "up_blocks.0.resnets.0.conv_shortcut.part0",
            "up_blocks.0.resnets.0.conv_shortcut.part1"} <= {d.name for d in decisions if d.use_cudnn}
    with torch.no_grad():
        for seed in range(2):
            prepared(**unet_inputs(family, 4, seed=seed))
    assert [(d.name, d.use_cudnn) for d in plan_cudnn_lowering(prepared, CUDNN_CFG, log=False)] == [
        (d.name, d.use_cudnn) for d in decisions]
    backend = CUDNN.backend_config(CUDNN_CFG)
    reference = convert_to_reference_fx(copy.deepcopy(prepared), backend_config=backend)
    quantizers = [n for n in reference.graph.nodes if n.target == torch.quantize_per_tensor]
    assert quantizers and all(n.args[3] == torch.qint8 for n in quantizers)
    for n in quantizers:
        assert int(getattr(reference, n.args[2].target)) == 0  # symmetric: zero point 0
    inputs = unet_inputs(family, 2, seed=9)
    with torch.no_grad():
        ref, simulated = reference(**inputs), build_simulation(prepared).gm(**inputs)
    # torch.ao's reference model (q/dq around float ops) and our simulation of the prepared graph compute the same
    # fake-quant model; they differ by 1-LSB roundings where torch's quantize (x * (1/s)) and the simulation
    # (x / s) round a tie differently, propagated through the UNet (measured 3.7% relative L2). The GPU kernels
    # themselves are not run here.
    assert float((ref - simulated).norm() / simulated.norm()) <= 0.05
    lowered = qdiff_ao.convert(copy.deepcopy(prepared))
    quantized = {name for name, m in lowered.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
                 and type(m).__name__ in ("Conv2d", "Linear")}
    assert quantized == {d.name for d in decisions if d.use_cudnn}
    assert all(type(lowered.get_submodule(name)) is nn.Linear for name in fallback)
    for name in quantized:
        w = lowered.get_submodule(name).weight()
        assert w.qscheme() == torch.per_tensor_affine and w.q_zero_point() == 0
        assert int(w.int_repr().min()) >= -8 and int(w.int_repr().max()) <= 7
    assert qdiff_ao.graph_info(lowered).cudnn_decisions == tuple(decisions)  # carried through convert
    assert [(d.name, d.use_cudnn) for d in plan_cudnn_lowering(lowered, CUDNN_CFG, log=False)] == [
        (d.name, d.use_cudnn) for d in decisions]


def test_add_shape_rule_on_traced_unet() -> None:
    """Time-embedding adds broadcast (B, C, 1, 1) onto (B, C, H, W): the cuDNN add kernel refuses them; residual
    adds have equal shapes. No add is lowered (qdiff_ao keeps adds float)."""
    traced = qdiff_ao.trace(build_unet("attn"), unet_inputs("attn", 2))
    adds = [d for d in plan_cudnn_lowering(traced, CUDNN_CFG, include_adds=True, log=False) if d.op == "add"]
    broadcast = [d for d in adds if not d.kernel_ok]
    assert broadcast and len(broadcast) < len(adds)
    assert all("same shape" in d.reasons[0] and ", 1, 1)" in d.reasons[0] for d in broadcast)
    assert all(d.reasons == ("qdiff_ao keeps adds in float (only conv/linear inputs are quantized)",)
               for d in adds if d.kernel_ok)
    assert not any(d.use_cudnn for d in adds)


@pytest.mark.skipif(not torch._C._has_cudnn, reason="torch built without cuDNN: no QuantizedCUDA kernels")
def test_rule_sources_in_the_installed_torch() -> None:
    """The registrations the plan relies on: cuDNN kernels for conv1d / conv2d (+relu), linear (+relu), add and
    their prepacks; none for transposed or 3-d convs, nor for reflection / replication padding."""

    def quantized_cuda(op: str) -> bool:
        return any(line.startswith("QuantizedCUDA:") for line in torch._C._dispatch_dump(op).splitlines())

    for op in ("conv1d", "conv1d_relu", "conv2d.new", "conv2d_relu.new", "conv1d_prepack", "conv2d_prepack",
               "linear", "linear_relu", "linear_prepack", "add", "add_relu"):
        assert quantized_cuda(f"quantized::{op}"), op
    for op in ("quantized::conv_transpose2d", "quantized::conv3d.new", "quantized::conv3d_prepack",
               "aten::reflection_pad2d", "aten::replication_pad2d.out"):
        assert not quantized_cuda(op), op


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_quantized_conv_rejects_string_padding(padding: str) -> None:
    """The source of the padding rule: torch.ao's quantized Conv2d hands the string to conv2d_prepack."""
    with pytest.raises(RuntimeError, match="padding"):
        nnq.Conv2d(8, 8, 3, padding=padding)


def test_bad_arguments() -> None:
    with pytest.raises(TypeError, match="GraphModule"):
        plan_cudnn_lowering(Zoo(), CUDNN_CFG)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="QuantConfig"):
        plan_cudnn_lowering(fx.symbolic_trace(Zoo()), {"weight_bits": 8})  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA path unverified: no GPU on this machine")
def test_cudnn_kernels_match_reference_on_gpu() -> None:
    """On a GPU: build, calibrate and convert on CUDA (weights packed by the cuDNN prepack), then compare the
    integer kernels with the simulated reference."""
    family = "attn"
    unet = build_unet(family).cuda()
    inputs = {k: v.cuda() for k, v in unet_inputs(family, 2).items()}
    prepared = qdiff_ao.prepare(unet, CUDNN_CFG, inputs, backend=CUDNN)
    with torch.no_grad():
        for seed in range(2):
            prepared(**{k: v.cuda() for k, v in unet_inputs(family, 4, seed=seed).items()})
    reference = convert_to_reference_fx(copy.deepcopy(prepared), backend_config=CUDNN.backend_config(CUDNN_CFG))
    lowered = qdiff_ao.convert(prepared)
    x = {k: v.cuda() for k, v in unet_inputs(family, 2, seed=9).items()}
    with torch.no_grad():
        out, ref = lowered(**x), reference(**x)
    # per layer: every conv measured within 0.3% of its reference module on the H200 (the biased linears were
    # 12-18% off before they were kept float)
    assert all(c.rel_l2 < 0.01 for c in check_lowered_layers(lowered, reference, x))
    assert float((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_cuda_quantized_linear_still_drops_its_bias() -> None:
    """Canary for the MEASURED linear rule: torch's QuantizedCUDA linear returns the bias-free product. If this
    fails, torch fixed the kernel and the rule in qdiff_ao.backends.cudnn_rules can be lifted."""
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(16, 32, generator=g) * 0.05, torch.randn(16, generator=g), torch.randn(4, 32, generator=g)
    wq = torch.quantize_per_tensor(w, float(w.abs().max()) / 127, 0, torch.qint8)
    xq = torch.quantize_per_tensor(x, float(x.abs().max()) / 127, 0, torch.qint8)
    without_bias = torch.nn.functional.linear(xq.dequantize(), wq.dequantize())
    scale = float(without_bias.abs().max()) / 100
    layer = torch.ao.nn.quantized.Linear(32, 16).cuda()
    layer.set_weight_bias(wq.cuda(), b.cuda())
    layer.scale, layer.zero_point = scale, 0
    out = layer(xq.cuda()).dequantize().cpu()
    assert float((out - without_bias).abs().max()) <= scale  # one output LSB: the bias (std 1) is missing
