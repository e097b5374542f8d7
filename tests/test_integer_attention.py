"""Quantized attention on integer matmuls (``qdiff_ao.deploy.attention_kernel`` and ``.integer_attention``): the
kernel against the f32 chain that ``convert_fx`` emits, the graph rewrite on tiny UNets, and the frozen fbgemm path
that uses it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qdiff_ao
from qdiff_ao.deploy import attention_kernel, integer_attention
from qdiff_ao.deploy.gemm_choice import EXACT_TERMS, faster_is_first
from qdiff_ao.deploy.integer_attention import (
    GEMM_ROWS,
    MIN_SCORES_PER_HEAD,
    IntegerAttention,
    integer_attention_kernel,
    lower_integer_attention,
)
from tests.unet_factory import build_unet, calibrated_unet, unet_inputs


def _quantized(shape: tuple[int, ...], scale: float, zero: int, seed: int) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 40 * scale + (128 - zero) * scale
    return torch.quantize_per_tensor(x, scale, zero, torch.quint8)


def _float_chain(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor, factor: float, p_scale: float,
                 p_zero: int) -> torch.Tensor:
    """What convert_fx's graph computes: f32 matmuls on the dequantized grids, 8-bit probabilities between."""
    probs = torch.softmax(torch.matmul(q.dequantize() * factor, k_t.dequantize()), -1)
    return torch.quantize_per_tensor(probs, p_scale, p_zero, torch.quint8).dequantize() @ v.dequantize()


@settings(max_examples=40, deadline=None)
@example(lead=[1], n=1, m=2, d=1, e=1, zeros=(0, 0, 0), scales=(0.0625,) * 3, factor=0.5, p_bits=255, p_zero=0,
         block=7, seed=0)  # a size-1 head dimension: transposed code views whose strides _int_mm misread
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=2), n=st.integers(1, 40), m=st.integers(1, 40),
       d=st.integers(1, 24), e=st.integers(1, 24), zeros=st.tuples(*[st.integers(0, 255)] * 3),
       scales=st.tuples(*[st.floats(1e-3, 0.1)] * 3), factor=st.floats(0.05, 2.0),
       p_bits=st.sampled_from([255, 127, 300]), p_zero=st.sampled_from([0, 0, 37, 128]),
       block=st.sampled_from([1, 7, 100, 1 << 18]), seed=st.integers(0, 2**16))
def test_kernel_equals_the_float_chain(lead: list[int], n: int, m: int, d: int, e: int, zeros: tuple[int, ...],
                                       scales: tuple[float, ...], factor: float, p_bits: int, p_zero: int,
                                       block: int, seed: int) -> None:
    """Any shapes, zero points, scales, block sizes and probability grids (1/300, or a zero point above 0:
    probabilities near 1 clip, the kernel's clamp path): the integer kernel equals the f32 chain up to f32 rounding,
    except that a probability on a rounding tie may land one code away (bounded by one code of P times the largest
    |V|). Both GEMMs of the codes give bit for bit the same output, also when the f32 GEMM cuts its reductions into
    pieces."""
    q = _quantized((*lead, n, d), scales[0], zeros[0], seed)
    k_t = _quantized((*lead, m, d), scales[1], zeros[1], seed + 1).transpose(-1, -2)
    v = _quantized((*lead, m, e), scales[2], zeros[2], seed + 2)
    p_scale = 1.0 / p_bits
    # integer path at any size (min_scores=0), on torch._int_mm
    out = integer_attention_kernel(q, k_t, v, factor, p_scale, p_zero, block, min_scores=0, int_gemm=True)
    # exact_terms 3 and 1: reductions longer than that are summed from f32 pieces in int32 (at 1 also the P V
    # product's keys); gemm_rows 2 and 1: the score product in row chunks (where the head dimension is exact in one
    # GEMM)
    for terms, gemm_rows in ((EXACT_TERMS, GEMM_ROWS), (EXACT_TERMS, 2), (3, 2), (1, 1)):
        on_f32 = integer_attention_kernel(q, k_t, v, factor, p_scale, p_zero, block, min_scores=0, int_gemm=False,
                                          exact_terms=terms, gemm_rows=gemm_rows)
        assert torch.equal(on_f32, out)
    ref = _float_chain(q, k_t, v, factor, p_scale, p_zero)
    assert out.shape == ref.shape and out.dtype == torch.float32
    one_code = p_scale * float(v.dequantize().abs().max())
    assert float((out - ref).abs().max()) <= one_code + 1e-5 * (1 + float(ref.abs().max()))
    assert float((out - ref).abs().mean()) <= 1e-3 * one_code + 1e-5 * (1 + float(ref.abs().max()))


@pytest.mark.parametrize("int_gemm", [True, False])
def test_kernel_is_exact_up_to_f32_rounding_on_typical_operands(int_gemm: bool) -> None:
    """Affine Q/K (zero points away from 128), symmetric V, 256 keys: no probability changes code."""
    q = _quantized((2, 4, 64, 16), 0.02, 110, 0)
    k_t = _quantized((2, 4, 256, 16), 0.03, 150, 1).transpose(-1, -2)
    v = _quantized((2, 4, 256, 16), 0.025, 128, 2)
    out = integer_attention_kernel(q, k_t, v, 0.25, 1 / 255, 0, min_scores=0, int_gemm=int_gemm)
    ref = _float_chain(q, k_t, v, 0.25, 1 / 255, 0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_large_heads_take_row_blocks_and_chunked_score_products() -> None:
    """SD-sized heads (1,024 keys, head dimension 16): each block holds some rows of one head, whose score product
    runs on the f32 GEMM in chunks of GEMM_ROWS rows. Bit for bit the _int_mm output, and the f32 chain's up to
    f32 rounding (a code on a rounding tie may move: at most one code of P times the largest |V|)."""
    q = _quantized((1, 2, 512, 16), 0.02, 110, 0)
    k_t = _quantized((1, 2, 1024, 16), 0.03, 150, 1).transpose(-1, -2)
    v = _quantized((1, 2, 1024, 16), 0.025, 140, 2)
    rows = attention_kernel.BLOCK_ELEMENTS // 1024
    assert rows < 512 and rows % GEMM_ROWS == 0 and rows > GEMM_ROWS  # the chunked one-head branch
    on_f32 = integer_attention_kernel(q, k_t, v, 0.25, 1 / 255, 0, int_gemm=False)
    assert torch.equal(on_f32, integer_attention_kernel(q, k_t, v, 0.25, 1 / 255, 0, int_gemm=True))
    assert torch.equal(on_f32, integer_attention_kernel(q, k_t, v, 0.25, 1 / 255, 0, int_gemm=False, gemm_rows=0))
    ref = _float_chain(q, k_t, v, 0.25, 1 / 255, 0)
    one_code = float(v.dequantize().abs().max()) / 255
    assert float((on_f32 - ref).abs().max()) <= one_code + 1e-5 * (1 + float(ref.abs().max()))
    assert float((on_f32 - ref).abs().mean()) <= 1e-3 * one_code


def test_f32_gemm_is_exact_at_its_longest_reduction() -> None:
    """The worst case of the f32 GEMM's bound: EXACT_TERMS products of -128 x -128 sum to exactly 2^24 (and one
    more term would not fit: 2^24 + 1 is not an f32); a longer reduction is cut into pieces and stays exact."""
    a = torch.full((2, EXACT_TERMS), -128.0)
    b = torch.full((EXACT_TERMS, 3), -128.0)
    exact = torch._int_mm(a.to(torch.int8), b.to(torch.int8))
    assert torch.equal(attention_kernel._exact_f32_matmul(a, b, EXACT_TERMS).to(torch.int32), exact)
    assert int(exact[0, 0]) == 1 << 24
    odd = torch.cat([a, torch.ones(2, 1)], 1), torch.cat([b, torch.ones(1, 3)], 0)  # 2^24 + 1: needs the pieces
    assert torch.equal(attention_kernel._exact_f32_matmul(*odd, EXACT_TERMS), exact + 1)


def test_f32_gemm_cuts_long_probability_rows_into_exact_pieces() -> None:
    """Where the codes of a probability row could sum past 2^24 against V's codes (here forced by exact_terms=1, 200
    keys), the f32 P V product is summed from pieces of keys in int32, and the output stays bit for bit that of
    _int_mm."""
    q = _quantized((1, 2, 8, 4), 0.02, 110, 0)
    k_t = _quantized((1, 2, 200, 4), 0.03, 150, 1).transpose(-1, -2)
    v = _quantized((1, 2, 200, 3), 0.025, 140, 2)  # z'_V = 12: the row sums are needed
    on_int = integer_attention_kernel(q, k_t, v, 0.5, 1 / 255, 0, min_scores=0, int_gemm=True)
    on_f32 = integer_attention_kernel(q, k_t, v, 0.5, 1 / 255, 0, min_scores=0, int_gemm=False, exact_terms=1)
    assert torch.equal(on_f32, on_int)


def test_gemm_choice_is_measured_once_per_block_shape() -> None:
    """The probe answers a bool per block shape and is cached: a call whose blocks have that shape gets the same
    choice without timing again, whatever its batch; a lowered attention leaves the choice to its calls."""
    first = attention_kernel.int_gemm_is_faster_for(2, 256, 16, 256, 16, attention_kernel.BLOCK_ELEMENTS, EXACT_TERMS,
                                                    GEMM_ROWS)
    hits = attention_kernel.int_gemm_is_faster_for.cache_info().hits
    assert isinstance(first, bool)
    # 3 batches x 2 heads of 256 x 256 scores: blocks of 4 whole heads (2^18 scores) of head dimension 16, but a
    # block never holds more heads than there are, so batch 1 probes 2 heads
    q = _quantized((1, 2, 256, 16), 0.02, 110, 0)
    k_t = _quantized((1, 2, 256, 16), 0.03, 150, 1).transpose(-1, -2)
    v = _quantized((1, 2, 256, 16), 0.025, 140, 2)
    assert attention_kernel.measured_int_gemm(q, k_t, v) is first
    assert attention_kernel.int_gemm_is_faster_for.cache_info().hits == hits + 1
    assert IntegerAttention(0.5).int_gemm is None
    small = _quantized((1, 2, 16, 8), 0.02, 110, 0)
    assert attention_kernel.measured_int_gemm(small, small.transpose(-1, -2), small) is False  # f32 chain: no GEMM


def test_the_faster_candidate_wins() -> None:
    """``faster_is_first`` ranks by time: a candidate that sleeps 3 ms loses to one that does nothing, either way
    round."""
    def slow() -> None:
        time.sleep(0.003)

    def fast() -> None:
        return None

    assert faster_is_first(fast, slow) is True
    assert faster_is_first(slow, fast) is False


def test_signed_operands_keep_the_f32_chain() -> None:
    """qint8 operands (another backend's activations) are not reinterpreted as quint8 codes: the kernel runs the
    f32 chain for them, even where the heads are large enough for the integer path."""
    x = torch.randn(1, 2, 32, 8, generator=torch.Generator().manual_seed(3))
    q = torch.quantize_per_tensor(x, 0.02, 0, torch.qint8)
    k_t = torch.quantize_per_tensor(x.flip(2), 0.02, 0, torch.qint8).transpose(-1, -2)
    v = torch.quantize_per_tensor(x * 0.5, 0.02, 0, torch.qint8)
    ref = _float_chain(q, k_t, v, 0.5, 1 / 255, 0)
    assert torch.equal(integer_attention_kernel(q, k_t, v, 0.5, 1 / 255, 0, min_scores=0), ref)


def test_small_heads_keep_the_f32_chain() -> None:
    """Below MIN_SCORES_PER_HEAD scores per head the kernel runs the f32 chain itself: bit-identical to it."""
    q = _quantized((2, 4, 16, 8), 0.02, 110, 0)
    k_t = _quantized((2, 4, 16, 8), 0.03, 150, 1).transpose(-1, -2)
    v = _quantized((2, 4, 16, 8), 0.025, 140, 2)
    assert 16 * 16 < MIN_SCORES_PER_HEAD
    assert torch.equal(integer_attention_kernel(q, k_t, v, 0.5, 1 / 255, 0), _float_chain(q, k_t, v, 0.5, 1 / 255, 0))


@pytest.mark.parametrize("family", ["attn", "cross_attn"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_graph_rewrite_replaces_every_attention(family: str, symmetric: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each softmax-quantized attention becomes one IntegerAttention; the matmuls are gone, the converted graph
    is left as it was, and each call equals the f32 chain on the same operands (a probability on a rounding tie
    may move one code: at most one code of P times the largest |V|, i.e. about half an LSB of an output grid
    spanning the attention output). The tiny UNets' heads are below MIN_SCORES_PER_HEAD: the limit is lifted so
    that every call takes the integer path. End to end the two graphs are usually bit-identical, but a moved code
    on a tie propagates through every later quantizer (with OMP_NUM_THREADS=1 one did: 1.5% rel. L2, 17% of the
    outputs moved, against 4.2% quantization error; on an AVX2-only CPU in CI the two were apart by 0.53 of the
    quantization error), so the whole-model check is relative to the distance from the float UNet: apart by less
    than it, and equally far from float (within 10%)."""
    monkeypatch.setattr(integer_attention, "MIN_SCORES_PER_HEAD", 0)
    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, attention_symmetric=symmetric)
    unet, prepared = calibrated_unet(family, cfg)
    n_softmax = len(qdiff_ao.graph_info(prepared).softmax_observers)
    converted = qdiff_ao.convert(prepared)
    before = converted.code
    lowered = lower_integer_attention(converted)
    assert converted.code == before
    calls = [n for n in lowered.graph.nodes if n.op == "call_module"
             and isinstance(lowered.get_submodule(str(n.target)), IntegerAttention)]
    assert len(calls) == n_softmax > 0
    assert not any(n.target in (torch.matmul, torch.bmm, torch.softmax) for n in lowered.graph.nodes)
    records: list[tuple[float, tuple[torch.Tensor, ...], torch.Tensor]] = []
    for node in calls:
        module = lowered.get_submodule(str(node.target))
        module.register_forward_hook(lambda mod, args, out: records.append((mod.factor, args, out)))
    inputs = unet_inputs(family, 3, t=500, seed=7)
    with torch.no_grad():
        a, b, exact = converted(**inputs), lowered(**inputs), unet(**inputs).sample
    assert len(records) == len(calls)
    for factor, (q, k_t, v, p_scale, p_zero), out in records:
        ref = _float_chain(q, k_t, v, factor, float(p_scale), int(p_zero))
        one_code = float(p_scale) * float(v.dequantize().abs().max())
        assert float((out - ref).abs().max()) <= one_code + 1e-5
        assert float((out - ref).abs().mean()) <= 1e-3 * one_code + 1e-6
    quant_error = float((a - exact).norm())
    assert float((a - b).norm()) < quant_error
    assert abs(float((b - exact).norm()) - quant_error) < 0.1 * quant_error


def test_float_and_16_bit_attention_are_left_alone() -> None:
    for cfg in (qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, quantize_attention=False),
                qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, softmax_bits=16)):
        _, prepared = calibrated_unet("attn", cfg)
        converted = qdiff_ao.convert(prepared)
        lowered = lower_integer_attention(converted)
        assert not any(isinstance(m, IntegerAttention) for m in lowered.modules())
        inputs = unet_inputs("attn", 2, seed=4)
        with torch.no_grad():
            assert torch.equal(converted(**inputs), lowered(**inputs))


def test_frozen_quantized_unet_uses_integer_attention_at_any_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen with either GEMM of the codes (the one the probe picks is forced here): the frozen graph runs the
    chosen one (freezing folds the other branch away), any batch size runs, it equals the lowered GraphModule bit
    for bit, and the two GEMMs give the same output. Against convert_fx's f32 chain the check is loose: a
    probability on a rounding tie moves one code and grows through the later quantizers (2.9% rel. L2 with one
    thread on an AVX-512 VNNI CPU; a wrong kernel would be off by the whole output)."""
    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8)
    unet, prepared = calibrated_unet("attn", cfg)
    monkeypatch.setattr(integer_attention, "MIN_SCORES_PER_HEAD", 0)  # the tiny UNet's heads take the GEMM path
    graph = qdiff_ao.convert(prepared)
    eager = qdiff_ao.QuantizedUNet(graph, like=unet)
    plain = qdiff_ao.QuantizedUNet(graph, like=unet).optimize_for_inference(integer_attention=False)
    assert "aten::_int_mm" not in str(plain._frozen[0].graph)
    outs: dict[bool, list[torch.Tensor]] = {}
    measured = qdiff_ao.QuantizedUNet(graph, like=unet).optimize_for_inference()
    frozen_code = str(measured._frozen[0].graph)
    # the measurement ran during the trace with the tracer detached: none of its ops entered the frozen graph
    assert "aten::randint" not in frozen_code and "_make_per_tensor_quantized_tensor" not in frozen_code
    for int_gemm in (True, False):
        monkeypatch.setattr(attention_kernel, "int_gemm_is_faster_for", lambda *shape, answer=int_gemm: answer)
        fast = qdiff_ao.QuantizedUNet(graph, like=unet).optimize_for_inference()
        assert ("aten::_int_mm" in str(fast._frozen[0].graph)) is int_gemm
        lowered = qdiff_ao.QuantizedUNet(lower_integer_attention(graph, int_gemm=int_gemm), like=unet)
        outs[int_gemm] = []
        for batch in (1, 5):  # the example batch is 1: the per-head loop must not be unrolled
            x = unet_inputs("attn", batch, seed=batch)
            with torch.no_grad():
                ref = eager(x["sample"], x["timestep"]).sample
                assert torch.equal(plain(x["sample"], x["timestep"]).sample, ref)
                out = fast(x["sample"], x["timestep"]).sample
                assert torch.equal(out, lowered(x["sample"], x["timestep"]).sample)
            assert float((out - ref).norm() / ref.norm()) < 0.1
            outs[int_gemm].append(out)
    assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False], strict=True))
    for batch, out in zip((1, 5), outs[True], strict=True):
        x = unet_inputs("attn", batch, seed=batch)
        with torch.no_grad():
            assert torch.equal(measured(x["sample"], x["timestep"]).sample, out)


def test_refuses_what_is_not_a_graph_module() -> None:
    with pytest.raises(TypeError, match="GraphModule"):
        lower_integer_attention(build_unet("attn"))  # type: ignore[arg-type]


def test_a_loaded_checkpoint_gets_integer_attention_too(tmp_path: Path) -> None:
    """The graph that from_pretrained rebuilds has the same attention chains: every one is rewritten."""
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)
    unet, prepared = calibrated_unet("attn", cfg)
    qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
    loaded = qdiff_ao.QuantizedUNet.from_pretrained(qunet.save_pretrained(tmp_path / "ckpt"))

    def rewritten(graph: torch.fx.GraphModule) -> int:
        return sum(isinstance(m, IntegerAttention) for m in lower_integer_attention(graph).modules())

    assert rewritten(loaded.graph_module) == rewritten(qunet.graph_module) > 0
