"""QDiffGraphInfo: one typed record per graph, carried through prepare/convert, deepcopy and every pass."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import qdiff_ao
from qdiff_ao.capture.graph_state import GRAPH_INFO_ATTR, QDiffGraphInfo, update_graph_info
from qdiff_ao.quantizers.simulation import build_simulation
from tests.unet_factory import build_unet, unet_inputs


def test_info_is_carried_from_trace_to_converted_graph() -> None:
    unet = build_unet("attn")
    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, timestep_aware=False)
    prepared = qdiff_ao.prepare(unet, cfg, unet_inputs("attn", 2))
    info = qdiff_ao.graph_info(prepared)
    assert info.trace is not None and info.trace.model_class == "UNet2DModel"
    assert info.config == cfg and isinstance(info.backend, qdiff_ao.backends.X86Backend)
    assert info.splits and all(s.conv.startswith("up_blocks.") for s in info.splits)
    assert len(info.softmax_observers) == info.trace.num_decomposed_attention > 0
    with torch.no_grad():
        prepared(**unet_inputs("attn", 2, seed=3))
    assert qdiff_ao.graph_info(copy.deepcopy(prepared)) == info
    converted = qdiff_ao.convert(prepared)
    assert qdiff_ao.graph_info(converted) == info
    assert getattr(converted, GRAPH_INFO_ATTR) == info  # the preserved attribute torch.ao copied


def test_update_replaces_fields_and_keeps_the_rest() -> None:
    gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 2))
    first = update_graph_info(gm, splits=())
    second = update_graph_info(gm, bias_correction={"layer": "x"})
    assert first.splits == second.splits == () and second.bias_correction == {"layer": "x"}
    assert qdiff_ao.graph_info(gm) is second
    with pytest.raises(TypeError, match="QDiffGraphInfo"):
        qdiff_ao.capture.graph_state.set_graph_info(gm, {"splits": ()})  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        second.splits = None  # type: ignore[misc]
    assert isinstance(second, QDiffGraphInfo)


def test_simulation_mode_is_a_context_manager() -> None:
    """The full-precision switch is read-only outside ``full_precision()``, restored on exit (also on error)."""
    unet = build_unet("attn")
    prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(weight_bits=4, act_bits=8), unet_inputs("attn", 2))
    with torch.no_grad():
        prepared(**unet_inputs("attn", 4, seed=2))
    sim = build_simulation(prepared)
    x = unet_inputs("attn", 2, seed=4)
    with pytest.raises(AttributeError):
        sim.state.fp = True  # type: ignore[misc]
    with torch.no_grad():
        quantized = sim.gm(**x)
        with sim.full_precision():
            assert sim.state.fp
            fp = sim.gm(**x)
        assert not sim.state.fp
        with pytest.raises(RuntimeError), sim.full_precision():
            raise RuntimeError("inside")
        assert not sim.state.fp
        torch.testing.assert_close(fp, unet(**x).sample, rtol=1e-4, atol=1e-5)  # bypassed: the float model
    assert not torch.allclose(quantized, fp, atol=1e-3)


def test_backend_argument_is_checked() -> None:
    with pytest.raises(TypeError, match="X86Backend"):
        qdiff_ao.prepare(build_unet("attn"), qdiff_ao.QuantConfig(), unet_inputs("attn", 2),
                         backend="x86")  # type: ignore[arg-type]
