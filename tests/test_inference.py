"""Tests of the frozen TorchScript path (QuantizedUNet.optimize_for_inference, inference.freeze_graph)."""

from __future__ import annotations

import pytest
import torch

import qdiff_ao
from qdiff_ao.capture.input_guards import traced_input_guards
from qdiff_ao.deploy.freezing import freeze_graph
from qdiff_ao.deploy.integer_attention import lower_integer_attention
from tests.unet_factory import build_unet, quantize_plain, unet_inputs

_GRAPHS: dict[tuple[str, bool], tuple[torch.nn.Module, torch.fx.GraphModule]] = {}


def _qunet(family: str, quantize_attention: bool = True) -> tuple[torch.nn.Module, qdiff_ao.QuantizedUNet]:
    """A fresh (not optimized) QuantizedUNet around a lowered graph shared between tests (lowering is slow)."""
    key = (family, quantize_attention)
    if key not in _GRAPHS:
        unet = build_unet(family)
        calib = [unet_inputs(family, 4, t, seed=i) for i, t in enumerate((900, 100))]
        cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8, quantize_attention=quantize_attention)
        _GRAPHS[key] = (unet, quantize_plain(unet, cfg, calib))
    unet, gm = _GRAPHS[key]
    return unet, qdiff_ao.QuantizedUNet(gm, like=unet)


@pytest.mark.parametrize("family", ["attn", "cross_attn", "class_embeds", "skip_fourier"])
@pytest.mark.parametrize("integer_attention", [True, False])
def test_frozen_module_is_bit_identical(family: str, integer_attention: bool) -> None:
    """Frozen == the graph it froze, bit for bit: with integer attention that is the rewritten graph."""
    unet, qunet = _qunet(family)
    eager = qdiff_ao.QuantizedUNet(lower_integer_attention(qunet.graph_module), like=unet) if integer_attention \
        else qunet
    cases = [unet_inputs(family, b, t, seed=10 + b) for b, t in ((1, 999), (3, 500), (5, 0))]
    with torch.no_grad():
        expected = [eager(**x).sample for x in cases]
        assert not qunet.optimized
        assert qunet.optimize_for_inference(integer_attention=integer_attention) is qunet and qunet.optimized
        for x, ref in zip(cases, expected):
            torch.testing.assert_close(qunet(**x).sample, ref, rtol=0, atol=0)
        # the diffusers calling conventions still work: int timestep, return_dict=False
        x = cases[1]
        out = qunet(x["sample"], 500, **{k: v for k, v in x.items() if k not in ("sample", "timestep")},
                    return_dict=False)[0]
        torch.testing.assert_close(out, expected[1], rtol=0, atol=0)


def test_float_sdpa_attention_graph_freezes_too() -> None:
    _, qunet = _qunet("attn", quantize_attention=False)
    x = unet_inputs("attn", 2, 300, seed=3)
    with torch.no_grad():
        ref = qunet(**x).sample
        qunet.optimize_for_inference(x)
        torch.testing.assert_close(qunet(**x).sample, ref, rtol=0, atol=0)


def test_inputs_are_still_checked() -> None:
    _, qunet = _qunet("attn")
    qunet.optimize_for_inference()
    bad = unet_inputs("attn", 2, 500)
    bad["sample"] = bad["sample"][:, :, :8, :8]
    with pytest.raises(ValueError, match="only dim 0, the batch, may change"):
        qunet(**bad)
    x = unet_inputs("attn", 2, 500)
    with pytest.raises(TypeError, match="dtype"):
        qunet(x["sample"].double(), x["timestep"])


def test_checkpoint_of_an_optimized_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    _, qunet = _qunet("attn")
    qunet.optimize_for_inference()
    qunet.save_pretrained(tmp_path / "ckpt")
    loaded = qdiff_ao.QuantizedUNet.from_pretrained(tmp_path / "ckpt")
    x = unet_inputs("attn", 2, 700, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).sample, qunet(**x).sample, rtol=0, atol=0)
        torch.testing.assert_close(loaded.optimize_for_inference()(**x).sample, qunet(**x).sample, rtol=0, atol=0)


def test_guards_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    _, qunet = _qunet("attn")
    guards = traced_input_guards(qunet.graph_module)
    assert guards["sample"] == (4, torch.float32, (3, 16, 16))
    assert guards["timestep"][:2] == (1, torch.int64)
    with pytest.raises(TypeError, match="fx.GraphModule"):
        freeze_graph(torch.nn.Linear(2, 2), {})  # type: ignore[arg-type]

    real_freeze = torch.jit.freeze

    class OffByOne(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs: torch.Tensor) -> torch.Tensor:
            return self.inner(**kwargs) + 1

    monkeypatch.setattr(torch.jit, "freeze", lambda m: OffByOne(real_freeze(m)))
    with pytest.raises(RuntimeError, match="differs from the GraphModule"):
        freeze_graph(qunet.graph_module, unet_inputs("attn", 1, 500))


def test_sixteen_bit_softmax_graph_freezes() -> None:
    unet = build_unet("attn")
    calib = [unet_inputs("attn", 4, t, seed=i) for i, t in enumerate((900, 100))]
    gm = quantize_plain(unet, qdiff_ao.QuantConfig(softmax_bits=16), calib)
    qunet = qdiff_ao.QuantizedUNet(gm, like=unet)
    x = unet_inputs("attn", 2, 400, seed=8)
    with torch.no_grad():
        ref = qunet(**x).sample
        torch.testing.assert_close(qunet.optimize_for_inference()(**x).sample, ref, rtol=0, atol=0)
