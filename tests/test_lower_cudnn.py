"""cuDNN lowering plan: which layers qualify for torch's QuantizedCUDA kernels and why the others stay float.

Only the decisions and the torch.ao setup are checked here (on CPU); the kernels need a GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import pytest
import torch
from torch import fx, nn

import qdiff_ao
from qdiff_ao._compat import convert_fx, convert_to_reference_fx
from qdiff_ao.lower_cudnn import (
    get_cudnn_backend_config,
    get_cudnn_qconfig_mapping,
    plan_cudnn_lowering,
    prepare_cudnn,
)
from tests.unet_factory import build_unet, unet_inputs

CUDNN_CFG = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8, act_symmetric=True, weight_granularity="per_tensor",
                                 timestep_aware=False)


class Zoo(nn.Module):
    """One layer per rule, all fed by x (8 channels); the outputs are pooled and summed.

        x ─┬─ ok (3x3) ───────────────┐
           ├─ grouped (groups=2) ─────┤
           ├─ dilated (dilation=2) ───┤
           ├─ odd (8 -> 6 channels) ──┼─ mean ─ ... ─ sum
           ├─ up (ConvTranspose2d) ───┤
           ├─ mean ─ fc_ok (8 -> 16) ─┤
           └─ mean ─ fc_odd (8 -> 10)─┘
    """

    def __init__(self) -> None:
        super().__init__()
        self.ok = nn.Conv2d(8, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.odd = nn.Conv2d(8, 6, 1)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.fc_ok = nn.Linear(8, 16)
        self.fc_odd = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3))
        parts = [m(x).mean() for m in (self.ok, self.grouped, self.dilated, self.odd, self.up)]
        return torch.stack(parts).sum() + self.fc_ok(pooled).mean() + self.fc_odd(pooled).mean()


EXPECTED = {  # layer -> (use_cudnn, phrase of the reason)
    "ok": (True, ""),
    "grouped": (False, "limited to groups = 1"),
    "dilated": (False, "dilation=(2, 2)"),
    "odd": (False, "out_channels=6 not a multiple of 4"),
    "up": (False, "transpose = false"),
    "fc_ok": (True, ""),
    "fc_odd": (False, "out_features=10 not a multiple of 4"),
}


def test_each_rule_decides_its_layer() -> None:
    decisions = {d.name: d for d in plan_cudnn_lowering(fx.symbolic_trace(Zoo()), CUDNN_CFG, log=False)}
    assert set(decisions) == set(EXPECTED)
    for name, (ok, phrase) in EXPECTED.items():
        d = decisions[name]
        assert d.use_cudnn is ok and d.kernel_ok is ok, d
        if ok:
            assert d.reasons == ()
        else:
            assert len(d.reasons) == 1 and phrase in d.reasons[0], d.reasons
    assert decisions["up"].op == "conv_transpose" and decisions["fc_ok"].op == "linear"


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
    for d in plan_cudnn_lowering(fx.symbolic_trace(Zoo()), cfg, log=False):
        assert not d.use_cudnn
        assert all(any(p in r for r in d.reasons) for p in phrases), d.reasons
    with pytest.raises(ValueError, match=next(iter(changes))):
        get_cudnn_qconfig_mapping(cfg)


def test_one_log_line_per_fallback_layer(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="qdiff_ao.lower_cudnn"):
        plan_cudnn_lowering(fx.symbolic_trace(Zoo()), CUDNN_CFG)
    lines = [r.getMessage() for r in caplog.records if "stays float" in r.getMessage()]
    assert len(lines) == sum(not ok for ok, _ in EXPECTED.values())
    for name, (ok, phrase) in EXPECTED.items():
        if not ok:
            assert any(line.startswith(f"cuDNN lowering: {name} (") and phrase in line for line in lines), name
    assert any("2 of 7 conv/linear layers qualify" in r.getMessage() for r in caplog.records)


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
    """Tiny UNet: the 3-channel conv_in / conv_out stay float, every other conv / linear (split halves included)
    gets qint8 symmetric quantizers and becomes a torch.ao quantized module; the plan agrees on the traced,
    prepared and converted graphs."""
    family = "attn"
    unet = build_unet(family)
    prepared, decisions = prepare_cudnn(unet, CUDNN_CFG, unet_inputs(family, 2))
    fallback = {d.name for d in decisions if not d.use_cudnn}
    assert fallback == {"conv_in", "conv_out"}
    assert {"up_blocks.0.resnets.0.conv_shortcut.part0", "up_blocks.0.resnets.0.conv_shortcut.part1"} <= {
        d.name for d in decisions if d.use_cudnn}
    with torch.no_grad():
        for seed in range(2):
            prepared(**unet_inputs(family, 4, seed=seed))
    assert [(d.name, d.use_cudnn) for d in plan_cudnn_lowering(prepared, CUDNN_CFG, log=False)] == [
        (d.name, d.use_cudnn) for d in decisions]
    backend = get_cudnn_backend_config(CUDNN_CFG)
    reference = convert_to_reference_fx(copy.deepcopy(prepared), backend_config=backend)
    quantizers = [n for n in reference.graph.nodes if n.target == torch.quantize_per_tensor]
    assert quantizers and all(n.args[3] == torch.qint8 for n in quantizers)
    for n in quantizers:
        assert int(getattr(reference, n.args[2].target)) == 0  # symmetric: zero point 0
    inputs = unet_inputs(family, 2, seed=9)
    with torch.no_grad():
        ref, fp = reference(**inputs), unet(**inputs).sample
    assert float((ref - fp).norm() / fp.norm()) < 0.5  # W4A8 simulated; the GPU kernels are not run here
    lowered = convert_fx(copy.deepcopy(prepared), backend_config=backend)
    quantized = {name for name, m in lowered.named_modules() if type(m).__module__.startswith("torch.ao.nn.quantized")
                 and type(m).__name__ in ("Conv2d", "Linear")}
    assert quantized == {d.name for d in decisions if d.use_cudnn}
    assert all(type(lowered.get_submodule(name)) is nn.Conv2d for name in fallback)
    for name in quantized:
        w = lowered.get_submodule(name).weight()
        assert w.qscheme() == torch.per_tensor_affine and w.q_zero_point() == 0
        assert int(w.int_repr().min()) >= -8 and int(w.int_repr().max()) <= 7
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
    assert not any(d.use_cudnn for d in adds)


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
    prepared, _ = prepare_cudnn(unet, CUDNN_CFG, inputs)
    with torch.no_grad():
        for seed in range(2):
            prepared(**{k: v.cuda() for k, v in unet_inputs(family, 4, seed=seed).items()})
    backend = get_cudnn_backend_config(CUDNN_CFG)
    reference = convert_to_reference_fx(copy.deepcopy(prepared), backend_config=backend)
    lowered = convert_fx(prepared, backend_config=backend)
    x = {k: v.cuda() for k, v in unet_inputs(family, 2, seed=9).items()}
    with torch.no_grad():
        out, ref = lowered(**x), reference(**x)
    assert float((out - ref).norm() / ref.norm()) < 0.05
