"""End to end on tiny diffusers UNets: trace -> split -> prepare -> calibrate -> convert to real INT8 modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qdiff_ao
from qdiff_ao._compat import convert_fx, convert_to_reference_fx, prepare_fx
from qdiff_ao.passes import find_output_layer, is_softmax_observer
from qdiff_ao.quantizers.simulation import build_simulation
from tests.unet_factory import FAMILIES, build_unet, calibrated_unet, unet_inputs

# Lowered INT8 kernels vs the fake-quant simulation of the same prepared graph. They differ only by the integer
# kernels' requantization: each quantized layer rounds its output to its output quantizer's grid (at most 1/2 LSB
# away from the simulation's rounding of the same real value), and those differences propagate through the UNet.
# Bound: 8 LSB of the output quantizer at the output (measured 2-6 LSB on these families at W4A8 and W8A8) and 5%
# relative L2 (measured 1.3-3.5%). Weights-only graphs have no requantization: equal up to float rounding.
MAX_OUTPUT_LSB = 8
MAX_REL_L2 = 0.05


def _float_layers(unet: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in unet.modules())


def _simulated(prepared: torch.fx.GraphModule, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float | None]:
    """(the fake-quant simulation's output, the LSB of the output quantizer or None), read before convert (which
    changes ``prepared``)."""
    _, quantizer = find_output_layer(prepared)
    lsb = None if quantizer is None else float(prepared.get_submodule(quantizer).calculate_qparams()[0])
    with torch.no_grad():
        return build_simulation(prepared).gm(**inputs), lsb


def _assert_matches_simulation(quantized: torch.fx.GraphModule, simulated: tuple[torch.Tensor, float | None],
                               inputs: dict[str, torch.Tensor], fourier: bool) -> None:
    expected, lsb = simulated
    with torch.no_grad():
        out = quantized(**inputs)
    rel = float((out - expected).norm() / expected.norm())
    assert rel <= MAX_REL_L2, rel
    if lsb is not None and not fourier:  # the Fourier UNet divides its output by t after the quantizer
        assert float((out - expected).abs().max()) <= MAX_OUTPUT_LSB * lsb + 1e-6


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_lowers_to_quantized_modules(family: str) -> None:
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)
    unet, prepared = calibrated_unet(family, cfg)
    inputs = unet_inputs(family, 3, t=500, seed=7)
    simulated = _simulated(prepared, inputs)
    quantized = qdiff_ao.convert(prepared)
    q_layers = [m for m in quantized.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.modules")
                and type(m).__name__ in ("Conv2d", "Linear")]
    n_splits = len(qdiff_ao.graph_info(quantized).splits or ())
    # Every float conv/linear became a quantized module; each split conv became two.
    assert len(q_layers) == _float_layers(unet) + n_splits
    for m in q_layers:
        codes = m.weight().int_repr()
        assert int(codes.min()) >= -8 and int(codes.max()) <= 7
    _assert_matches_simulation(quantized, simulated, inputs, fourier=family == "skip_fourier")


@pytest.mark.parametrize("family", ["attn", "cross_attn"])
def test_lowered_kernels_agree_with_fake_quant_reference(family: str) -> None:
    """fbgemm INT8 output vs torch.ao's reference (simulated q/dq) model: relative L2 difference below 5%.

    The two differ only by the integer kernels' requantization rounding (at most 1 LSB per layer output, checked
    in test_qconfig_fx); through ~20 layers of a random-weight UNet that accumulates to 2-3% (measured 2.9%).
    """
    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8)
    _, prepared = calibrated_unet(family, cfg)
    import copy

    reference = convert_to_reference_fx(copy.deepcopy(prepared), backend_config=qdiff_ao.get_backend_config(cfg))
    lowered = qdiff_ao.convert(prepared)
    inputs = unet_inputs(family, 2, t=500, seed=3)
    with torch.no_grad():
        a, b = lowered(**inputs), reference(**inputs)
    rel = float((a - b).norm() / b.norm())
    assert rel < 0.05, rel


@pytest.mark.parametrize("weight_bits,act_bits", [(8, 8), (4, None), (8, None)])
def test_w8a8_and_weights_only(weight_bits: int, act_bits: int | None) -> None:
    cfg = qdiff_ao.QuantConfig(weight_bits=weight_bits, act_bits=act_bits)
    unet, prepared = calibrated_unet("attn", cfg)
    inputs = unet_inputs("attn", 2, seed=5)
    simulated = _simulated(prepared, inputs)
    quantized = qdiff_ao.convert(prepared)
    if act_bits is not None:
        _assert_matches_simulation(quantized, simulated, inputs, fourier=False)
    else:  # reference modules hold the integer weights; activations stay float: the simulation's arithmetic
        with torch.no_grad():
            torch.testing.assert_close(quantized(**inputs), simulated[0], rtol=1e-4, atol=1e-4)
    if act_bits is None:
        kinds = {type(m).__name__ for m in quantized.modules()}
        assert "ClampedReferenceConv2d" in kinds and "quantize_per_tensor" not in quantized.code


def test_users_own_prepare_fx_and_convert_fx_with_our_mapping() -> None:
    """The plain torch.ao workflow on a qdiff_ao.trace graph works with our mapping and backend config."""
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)
    unet = build_unet("attn")
    inputs = unet_inputs("attn", 2)
    gm = qdiff_ao.passes.split_shortcut(qdiff_ao.trace(unet, inputs))
    prepared = prepare_fx(gm, qdiff_ao.get_qconfig_mapping(cfg), tuple(inputs.values()),
                          backend_config=qdiff_ao.get_backend_config(cfg))
    with torch.no_grad():
        prepared(**inputs)
    check = unet_inputs("attn", 5, seed=6)
    simulated = _simulated(prepared, check)
    quantized = convert_fx(prepared, backend_config=qdiff_ao.get_backend_config(cfg))
    q_layers = [m for m in quantized.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.modules")
                and type(m).__name__ in ("Conv2d", "Linear")]
    assert len(q_layers) == _float_layers(unet) + len(qdiff_ao.graph_info(gm).splits or ())
    _assert_matches_simulation(quantized, simulated, check, fourier=False)


def test_softmax_outputs_are_quantized_unsigned() -> None:
    for bits in (8, 16):
        cfg = qdiff_ao.QuantConfig(softmax_bits=bits)
        _, prepared = calibrated_unet("attn", cfg)
        names = qdiff_ao.graph_info(prepared).softmax_observers
        observers = [prepared.get_submodule(n) for n in names]
        assert len(observers) == qdiff_ao.graph_info(prepared).trace.num_decomposed_attention > 0
        assert all(is_softmax_observer(o) and o.quant_min == 0 and o.quant_max == 2**bits - 1 for o in observers)
        for o in observers:
            assert int(o.calculate_qparams()[1]) == 0
        quantized = qdiff_ao.convert(prepared)
        with torch.no_grad():
            assert bool(torch.isfinite(quantized(**unet_inputs("attn", 2))).all())


def test_quantized_unet_runs_in_ddim_pipeline() -> None:
    from diffusers import DDIMPipeline, DDIMScheduler

    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8)
    unet, prepared = calibrated_unet("attn", cfg)
    qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
    assert qunet.config.sample_size == 16 and qunet.dtype == torch.float32
    pipe = DDIMPipeline(unet=qunet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3)
    # Timestep forms pipelines use: int, float, 0-d and 1-d tensors.
    x = torch.randn(2, 3, 16, 16)
    outs = [qunet(x, t).sample for t in (10, 10.0, torch.tensor(10), torch.tensor([10]), torch.tensor([10, 10]))]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    with pytest.raises(RuntimeError, match="cannot be trained"):
        qunet.train()
    with pytest.raises(ValueError, match="fractional"):
        qunet(x, 10.5)


def test_quantized_unet_refuses_dtype_and_device_changes() -> None:
    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8)
    unet, prepared = calibrated_unet("attn", cfg)
    qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
    assert qunet.to("cpu") is qunet and qunet.to(torch.float32) is qunet
    with pytest.raises(TypeError, match="cannot be cast"):
        qunet.half()
    with pytest.raises(TypeError, match="cannot be cast"):
        qunet.to(dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="CPU only"):
        qunet.to("cuda")
