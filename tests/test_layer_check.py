"""qdiff_ao.deploy.layer_check: each lowered kernel against its torch.ao reference module."""

from __future__ import annotations

import copy

import pytest
import torch

import qdiff_ao
from qdiff_ao._compat import convert_to_reference_fx
from qdiff_ao.deploy.layer_check import check_lowered_layers
from tests.unet_factory import calibrated_unet, unet_inputs

CFG = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)


def _lowered_and_reference(family: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    _, prepared = calibrated_unet(family, CFG)
    reference = convert_to_reference_fx(copy.deepcopy(prepared), backend_config=qdiff_ao.get_backend_config(CFG))
    return qdiff_ao.convert(prepared), reference


@pytest.mark.parametrize("family", ["attn", "cross_attn"])
def test_x86_kernels_are_within_one_output_step(family: str) -> None:
    """fbgemm / oneDNN kernels requantize as the reference does, up to a rounding tie: at most one step."""
    lowered, reference = _lowered_and_reference(family)
    checks = check_lowered_layers(lowered, reference, unet_inputs(family, 2, seed=9))
    kinds = {c.kind for c in checks}
    assert {"Conv2d", "Linear"} <= kinds and len(checks) > 40
    assert all(c.lsb <= 1.0 + 1e-4 and c.rel_l2 < 2e-3 for c in checks), checks[:3]
    assert checks == sorted(checks, key=lambda c: -c.lsb)


def test_a_kernel_that_drops_its_bias_is_named() -> None:
    """The failure the GPU run found, rebuilt on CPU: a quantized layer whose bias is gone is the worst layer."""
    lowered, reference = _lowered_and_reference("attn")
    broken = lowered.get_submodule("time_embedding.linear_1")
    broken.set_weight_bias(broken.weight(), None)
    worst = check_lowered_layers(lowered, reference, unet_inputs("attn", 2, seed=9))[0]
    assert worst.name == "time_embedding.linear_1" and worst.lsb > 5 and worst.rel_l2 > 0.05


def test_unrelated_reference_is_refused() -> None:
    lowered, _ = _lowered_and_reference("attn")
    other = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="reference module of the same name"):
        check_lowered_layers(lowered, other, unet_inputs("attn", 2))
