"""qdiff_ao.capture.devices: moving inputs to the model, and moving a traced graph with its device constants.

The "meta" device stands in for a GPU: a graph whose constants still say CPU fails there exactly as it fails on
CUDA (tests/test_cuda_paths.py runs the real thing where a GPU exists).
"""

from __future__ import annotations

import copy

import pytest
import torch

import qdiff_ao
from qdiff_ao.capture.devices import inputs_device, module_device, move_graph, to_device
from tests.unet_factory import build_unet, unet_inputs


def test_module_and_inputs_device() -> None:
    assert module_device(torch.nn.Linear(2, 2).to("meta")).type == "meta"
    assert module_device(torch.nn.ReLU()).type == "cpu"  # no parameters or buffers
    moved = to_device({"sample": torch.zeros(2), "steps": 3}, torch.device("meta"))
    assert moved["sample"].device.type == "meta" and moved["steps"] == 3
    assert inputs_device(moved).type == "meta"
    assert inputs_device({"steps": 3}).type == "cpu"


@pytest.mark.parametrize("family", ["attn", "skip_fourier"])
def test_move_graph_rewrites_device_constants(family: str) -> None:
    """The traced graph holds ``device=cpu`` constants (``torch.ones`` of the timestep broadcast, the skip
    blocks' ``.to(device)``): ``Module.to`` leaves them and the graph fails on the new device; ``move_graph``
    rewrites every one of them."""
    gm = qdiff_ao.trace(build_unet(family), unet_inputs(family, 2))
    x = to_device(unet_inputs(family, 3, seed=4), torch.device("meta"))
    with torch.no_grad():
        expected_shape = gm(**unet_inputs(family, 3, seed=4)).shape
        with pytest.raises(RuntimeError, match="device"):
            copy.deepcopy(gm).to("meta")(**x)
        moved = move_graph(gm, "meta")
        out = moved(**x)
    assert out.device.type == "meta" and out.shape == expected_shape
    constants = [a for n in moved.graph.nodes for a in (*n.args, *n.kwargs.values()) if isinstance(a, torch.device)]
    assert constants and all(d.type == "meta" for d in constants)
