"""Pass tests of split_shortcut: graph structure, float equivalence, idempotence, and the real UNet count."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

import qdiff_ao
from qdiff_ao._compat import convert_fx, prepare_fx
from qdiff_ao.passes.shortcut_split import SplitConv2d, SplitRecord, SplitShortcutPass, split_shortcut


class SkipBlock(nn.Module):
    """An up-block resnet's input side:

        h ────┐
              cat ──┬── conv_shortcut ──┐
       skip ──┘     └── norm1 ── conv1 ─┴── add ── out
    """

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(4, 12)
        self.conv1 = nn.Conv2d(12, 8, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(12, 8, 1)

    def forward(self, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = torch.cat([h, skip], dim=1)
        return self.conv1(self.norm1(x)) + self.conv_shortcut(x)


def _traced() -> tuple[fx.GraphModule, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    gm = fx.symbolic_trace(SkipBlock().eval())
    inputs = (torch.randn(2, 8, 6, 6) * 5, torch.randn(2, 4, 6, 6) * 0.2)
    ShapeProp(gm).propagate(*inputs)
    return gm, inputs


def test_split_rewrites_only_the_conv_consuming_the_concat() -> None:
    gm, inputs = _traced()
    before = Counter(n.target for n in gm.graph.nodes)
    with torch.no_grad():
        ref = gm(*inputs)
    result = SplitShortcutPass()(gm)
    assert result.modified
    after = Counter(n.target for n in gm.graph.nodes)
    assert before["conv_shortcut"] == 1 and after["conv_shortcut"] == 0
    assert after["conv_shortcut.part0"] == 1 and after["conv_shortcut.part1"] == 1
    assert after[torch.cat] == 1 and after["norm1"] == 1  # the concat still feeds GroupNorm
    assert isinstance(gm.conv_shortcut, SplitConv2d)
    assert gm.conv_shortcut.part0.weight.shape == (8, 8, 1, 1) and gm.conv_shortcut.part1.weight.shape == (8, 4, 1, 1)
    assert gm.conv_shortcut.part1.bias is None
    assert qdiff_ao.graph_info(gm).splits == (SplitRecord("cat", "conv_shortcut", 8, (8, 4)),)
    with torch.no_grad():
        assert float((gm(*inputs) - ref).abs().max()) <= 1e-5


def test_split_is_idempotent() -> None:
    gm, _ = _traced()
    split_shortcut(gm)
    code = gm.code
    assert not SplitShortcutPass()(gm).modified
    assert gm.code == code


def test_split_halves_get_their_own_observers_and_quantized_convs() -> None:
    gm, inputs = _traced()
    split_shortcut(gm)
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)
    prepared = prepare_fx(gm, qdiff_ao.get_qconfig_mapping(cfg), inputs,
                          backend_config=qdiff_ao.get_backend_config(cfg))
    observed_inputs = {n.args[0].name for n in prepared.graph.nodes
                       if n.op == "call_module" and "activation_post_process" in str(n.target)}
    assert {"h", "skip"} <= observed_inputs  # one activation quantizer per half
    with torch.no_grad():
        prepared(*inputs)
    quantized = convert_fx(prepared, backend_config=qdiff_ao.get_backend_config(cfg))
    for part in ("part0", "part1"):
        mod = quantized.get_submodule(f"conv_shortcut.{part}")
        assert type(mod).__name__ == "Conv2d" and "quantized" in type(mod).__module__
    # The two halves have very different ranges: their scales must differ accordingly.
    scales = {}
    for n in quantized.graph.nodes:
        if n.target is torch.quantize_per_tensor and n.args[0].name in ("h", "skip"):
            scales[n.args[0].name] = float(getattr(quantized, n.args[1].target))
    assert scales["h"] > 5 * scales["skip"]


def test_split_needs_channel_metadata() -> None:
    gm = fx.symbolic_trace(SkipBlock().eval())
    with pytest.raises(ValueError, match="tensor_meta"):
        split_shortcut(gm)


@pytest.mark.slow
def test_ddpm_cifar10_architecture_has_twelve_skip_splits() -> None:
    """google/ddpm-cifar10-32's architecture (random weights): 12 concats, [256|256]x8, [256|128]x2, [128|128]x2."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([10])
    gm = split_shortcut(qdiff_ao.trace(unet, {"sample": x, "timestep": t}))
    counts = Counter(r.channels for r in qdiff_ao.graph_info(gm).splits)
    assert counts == {(256, 256): 8, (256, 128): 2, (128, 128): 2}
    x2, t2 = torch.randn(2, 3, 32, 32), torch.tensor([5, 5])
    with torch.no_grad():
        assert float((gm(x2, t2) - unet(x2, t2).sample).abs().max()) <= 1e-4
