"""prepare_fx / convert_fx with our QConfigMapping and BackendConfig: real quantized modules, in-range weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import qdiff_ao
from qdiff_ao._compat import convert_fx, prepare_fx
from qdiff_ao.quantizers.reference import ClampedReferenceConv2d, ClampedReferenceLinear


class ConvLinearNet(nn.Module):
    """x -> conv -> SiLU -> conv -> mean(H, W) -> linear.

        x ─ conv1 ─ silu ─ conv2 ─ mean ─ fc ─ out
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv2(self.act(self.conv1(x))).mean(dim=(2, 3)))


def _quantize(cfg: qdiff_ao.QuantConfig) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = ConvLinearNet().eval()
    # A few large weights so a 4-bit min/max grid would be dominated by outliers.
    with torch.no_grad():
        model.conv2.weight[:, :, 1, 1] *= 8
    x = torch.randn(4, 3, 8, 8)
    prepared = prepare_fx(model, qdiff_ao.get_qconfig_mapping(cfg), (x,),
                          backend_config=qdiff_ao.get_backend_config(cfg))
    with torch.no_grad():
        for _ in range(3):
            prepared(torch.randn(4, 3, 8, 8))
    quantized = convert_fx(prepared, backend_config=qdiff_ao.get_backend_config(cfg))
    return model, quantized, x


@pytest.mark.parametrize("weight_bits,act_bits", [(4, 8), (8, 8), (4, None), (2, 8)])
@pytest.mark.parametrize("range_method", ["lp", "minmax"])
def test_converted_modules_are_quantized_and_weights_in_range(weight_bits, act_bits, range_method) -> None:
    cfg = qdiff_ao.QuantConfig(weight_bits=weight_bits, act_bits=act_bits, range_method=range_method)
    model, quantized, x = _quantize(cfg)
    qmin, qmax = cfg.weight_qrange()
    for name in ("conv1", "conv2", "fc"):
        mod = quantized.get_submodule(name)
        if act_bits is None:
            # Weights only: torch.ao reference modules (float activations) holding integer weights.
            assert isinstance(mod, (ClampedReferenceConv2d, ClampedReferenceLinear))
            codes = mod.get_quantized_weight().int_repr()
        else:
            assert type(mod).__module__.startswith("torch.ao.nn.quantized.modules"), type(mod)
            codes = mod.weight().int_repr()
        assert int(codes.min()) >= qmin and int(codes.max()) <= qmax, (name, codes.min(), codes.max())
    with torch.no_grad():
        ref, out = model(x), quantized(x)
    rel = float((out - ref).norm() / ref.norm())
    assert rel < {8: 0.05, 4: 0.25, 2: 0.9}[weight_bits], rel


def test_w4_lp_weights_use_the_full_signed_range_without_overflow() -> None:
    """Lp search clips, and torch's quantize_per_channel would then emit codes beyond 7; ours clamps them."""
    _, quantized, _ = _quantize(qdiff_ao.QuantConfig(weight_bits=4, act_bits=8))
    codes = quantized.conv2.weight().int_repr()
    assert int(codes.max()) == 7 and int(codes.min()) == -8


def test_w8a8_default_reduces_weight_range_to_avoid_int16_saturation() -> None:
    """On AVX2 without VNNI, full-range u8 x s8 pairs saturate int16; W8A8 defaults to weights in [-64, 63]."""
    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8)
    assert cfg.weight_qrange() == (-64, 63)
    _, quantized, _ = _quantize(cfg)
    codes = quantized.conv2.weight().int_repr()
    assert int(codes.abs().max()) <= 64


def test_quantized_conv_matches_integer_reference_within_one_lsb() -> None:
    """The fbgemm conv output equals a float re-computation from its integer operands within 1 output LSB."""
    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, timestep_aware=False)
    _, quantized, _ = _quantize(cfg)
    qconv = quantized.conv2
    torch.manual_seed(3)
    xq = torch.quantize_per_tensor(torch.rand(2, 16, 8, 8) * 4, 4 / 255, 0, torch.quint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = qconv(xq)
    w = qconv.weight().dequantize()
    ref = torch.nn.functional.conv2d(xq.dequantize(), w, qconv.bias(), padding=1)
    lsb = out.q_scale()
    ref_codes = torch.clamp(torch.round(ref / lsb) + out.q_zero_point(), 0, 255)
    assert int((out.int_repr().int() - ref_codes.int()).abs().max()) <= 1


def test_calling_our_prepare_fx_does_not_warn_deprecation() -> None:
    cfg = qdiff_ao.QuantConfig()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        prepare_fx(ConvLinearNet().eval(), qdiff_ao.get_qconfig_mapping(cfg), (torch.randn(1, 3, 8, 8),),
                   backend_config=qdiff_ao.get_backend_config(cfg))


def test_integer_nodes_get_no_observer() -> None:
    """Timestep arithmetic on int64 (diffusers: timesteps * ones(B)) is never observed."""

    class WithTimestep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            tt = t * torch.ones(x.shape[0], dtype=t.dtype)
            return self.fc(x) + tt[:, None].float()

    cfg = qdiff_ao.QuantConfig()
    x, t = torch.randn(2, 4), torch.tensor([7])
    prepared = prepare_fx(WithTimestep().eval(), qdiff_ao.get_qconfig_mapping(cfg), (x, t),
                          backend_config=qdiff_ao.get_backend_config(cfg))
    prepared(x, t)  # an observer on int64 would raise TypeError here
    observed = [n.args[0].name for n in prepared.graph.nodes
                if n.op == "call_module" and "activation_post_process" in str(n.target)]
    assert sorted(observed) == ["fc", "x"]
    convert_fx(prepared, backend_config=qdiff_ao.get_backend_config(cfg))(x, t)


def test_config_validation_names_field_and_value() -> None:
    with pytest.raises(ValueError, match=r"weight_bits must be an integer in \[2, 8\], got 9"):
        qdiff_ao.QuantConfig(weight_bits=9)
    with pytest.raises(ValueError, match="act_bits"):
        qdiff_ao.QuantConfig(act_bits=3)
    with pytest.raises(ValueError, match="softmax_bits"):
        qdiff_ao.QuantConfig(softmax_bits=12)
    with pytest.raises(ValueError, match="act_observer"):
        qdiff_ao.QuantConfig(act_observer="no-such-observer")
    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=None)
    assert qdiff_ao.QuantConfig.from_dict(cfg.to_dict()) == cfg
