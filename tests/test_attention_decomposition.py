"""Tests of the SDPA decomposition in qdiff_ao.trace: (q * scale) @ k^T -> softmax -> @ v, masks and scale."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qdiff_ao.capture.graph_state import ATTENTION_ROLE
from qdiff_ao.capture.tracing import trace
from tests.tracing_helpers import ATOL, _build, _inputs, _targets


def test_decomposed_attention_pattern() -> None:
    """Each softmax reads matmul(mul(q, scale), k.transpose(-1, -2)) and feeds matmul(probs, v)."""
    unet, num_attn = _build("cross_attn_cond")
    gm = trace(unet, _inputs("cross_attn_cond", 1, seed=1))
    softmaxes = [n for n in gm.graph.nodes if n.target is torch.softmax]
    assert len(softmaxes) == num_attn
    for sm in softmaxes:
        assert sm.kwargs == {"dim": -1} and sm.meta[ATTENTION_ROLE] == "softmax"
        qk = sm.args[0]
        scaled = qk.args[0]
        head_dim = scaled.args[0].meta["tensor_meta"].shape[-1]
        assert scaled.target is operator.mul and scaled.args[1] == pytest.approx(head_dim**-0.5)
        assert qk.target is torch.matmul and qk.meta[ATTENTION_ROLE] == "qk"
        assert qk.args[1].target == "transpose" and qk.args[1].args[1:] == (-1, -2)
        (pv,) = sm.users
        assert pv.target is torch.matmul and pv.args[0] is sm and pv.meta[ATTENTION_ROLE] == "pv"
        assert sm.meta["nn_module_stack"]  # grouped under the Attention module that owns it


class _SDPA(nn.Module):
    """q, k, v ─► F.scaled_dot_product_attention(mask / causal) ─► out"""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        length, source = int(q.shape[-2]), int(k.shape[-2])  # non-batch dims: constants are fine
        if self.mode == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mode == "bool_mask":
            mask = torch.rand(length, source, generator=torch.Generator().manual_seed(0)) > 0.3
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask | torch.eye(length, source, dtype=torch.bool))
        mask = torch.randn(length, source, generator=torch.Generator().manual_seed(0))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)


@pytest.mark.parametrize("mode", ["causal", "bool_mask", "float_mask_scale"])
def test_sdpa_decomposition_matches_masks_and_scale(mode: str) -> None:
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    gm = trace(_SDPA(mode), {"q": q, "k": k, "v": v})
    assert _targets(gm)[F.scaled_dot_product_attention] == 0
    q, k, v = (torch.randn(3, 2, 5, 4) for _ in range(3))
    assert (gm(q, k, v) - _SDPA(mode)(q, k, v)).abs().max().item() <= ATOL
