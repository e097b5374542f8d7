"""Symmetric Q, K, V quantizers (``passes.symmetric_attention_operands``, the measured choice
``passes.choose_attention_grids``) and their INT8 export."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qdiff_ao
from qdiff_ao.passes.attention_operands import (
    attention_operand_observers,
    choose_attention_grids,
    is_symmetric_observer,
)
from qdiff_ao.passes.softmax_observation import is_softmax_observer
from qdiff_ao.quantizers.qdq import ActivationQDQ
from tests.unet_factory import build_unet, calibrated_unet, unet_inputs


@pytest.mark.parametrize("family", ["attn", "cross_attn"])
def test_attention_symmetric_gives_q_k_v_symmetric_observers_and_leaves_the_rest(family: str) -> None:
    cfg = qdiff_ao.QuantConfig(attention_symmetric=True)
    prepared = qdiff_ao.prepare(build_unet(family), cfg, unet_inputs(family, 2))
    operands = attention_operand_observers(prepared)
    softmax = [n for n in operands if is_softmax_observer(prepared.get_submodule(n))]
    qkv = [n for n in operands if n not in softmax]
    assert softmax and len(qkv) == 3 * len(softmax)  # Q, K, V per attention
    assert all(is_symmetric_observer(prepared.get_submodule(n)) for n in qkv)
    assert not any(is_symmetric_observer(prepared.get_submodule(n)) for n in softmax)
    others = [name for name, m in prepared.named_modules()
              if name.startswith("activation_post_process") and "." not in name and name not in operands]
    assert others and not any(is_symmetric_observer(prepared.get_submodule(n)) for n in others)


def test_default_is_affine_measured_calibrates_affine_and_old_configs_read_as_false() -> None:
    """The default keeps affine Q, K, V; "measured" calibrates affine ones too (the choice comes after
    calibration); records without the field read as False."""
    assert qdiff_ao.QuantConfig().attention_symmetric is False
    cfg = qdiff_ao.QuantConfig(attention_symmetric="measured")
    for c in (qdiff_ao.QuantConfig(), cfg):
        prepared = qdiff_ao.prepare(build_unet("attn"), c, unet_inputs("attn", 2))
        assert not any(is_symmetric_observer(prepared.get_submodule(n)) for n in attention_operand_observers(prepared))
    recorded = qdiff_ao.QuantConfig(attention_symmetric=True).to_dict()
    del recorded["attention_symmetric"]  # a checkpoint written before the field existed
    assert qdiff_ao.QuantConfig.from_dict(recorded).attention_symmetric is False
    assert qdiff_ao.QuantConfig.from_dict(cfg.to_dict()).attention_symmetric == "measured"
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="attention_symmetric"):
            qdiff_ao.QuantConfig(attention_symmetric=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["attn", "cross_attn"])
def test_measured_choice_gives_the_grids_a_symmetric_calibration_gives_where_cheap(family: str) -> None:
    """Choosing after calibration ends with exactly the qparams of Q, K, V observers that were symmetric from the
    start (same statistics), for every quantizer within the price; the others keep their affine grids."""
    _, measured = calibrated_unet(family, qdiff_ao.QuantConfig(attention_symmetric="measured"))
    _, symmetric = calibrated_unet(family, qdiff_ao.QuantConfig(attention_symmetric=True))
    affine = {n: measured.get_submodule(n).calculate_qparams() for n in attention_operand_observers(measured)}
    choices = choose_attention_grids(measured)
    assert len(choices) == 3 * len([n for n in affine if is_softmax_observer(measured.get_submodule(n))])
    for c in choices:
        got = measured.get_submodule(c.name).calculate_qparams()
        want = symmetric.get_submodule(c.name).calculate_qparams() if c.symmetric else affine[c.name]
        assert c.symmetric == (c.cost_bits <= 0.5) and c.cost_bits >= 0
        assert is_symmetric_observer(measured.get_submodule(c.name)) == c.symmetric
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert any(c.symmetric for c in choices)
    # the price is the step ratio of the two grids
    for c in choices:
        s_sym = symmetric.get_submodule(c.name).calculate_qparams()[0]
        assert c.cost_bits == pytest.approx(max(0.0, float(torch.log2(s_sym / affine[c.name][0]))), abs=1e-6)
    assert [c.symmetric for c in choose_attention_grids(measured)] == [c.symmetric for c in choices]  # idempotent
    assert all(c.cost_bits == 0 for c in choose_attention_grids(measured) if c.symmetric)


def test_a_one_sided_q_k_v_range_keeps_its_affine_grid() -> None:
    """A quantizer whose calibrated values are all >= 0 would lose a whole bit to a symmetric grid: it stays
    affine; ``max_cost_bits`` moves the price limit; a graph without a config is refused."""
    _, prepared = calibrated_unet("attn", qdiff_ao.QuantConfig())
    name = next(n for n in attention_operand_observers(prepared) if not is_softmax_observer(prepared.get_submodule(n)))
    fresh = qdiff_ao.qconfig.activation_observer(qdiff_ao.QuantConfig())()
    for t in (900, 100):
        with qdiff_ao.timestep_context(t):
            fresh(torch.rand(4, 64) * 3)
    prepared.add_submodule(name, fresh)
    choice = {c.name: c for c in choose_attention_grids(prepared)}[name]
    assert choice.cost_bits == pytest.approx(1.0, abs=0.05) and not choice.symmetric
    assert not is_symmetric_observer(prepared.get_submodule(name))
    assert {c.name: c for c in choose_attention_grids(prepared, max_cost_bits=1.5)}[name].symmetric
    with pytest.raises(ValueError, match="max_cost_bits"):
        choose_attention_grids(prepared, max_cost_bits=-1)
    with pytest.raises(ValueError, match="QuantConfig"):
        choose_attention_grids(torch.fx.symbolic_trace(torch.nn.Linear(2, 2)))


@settings(max_examples=40, deadline=None)
@given(st.floats(-50, 50), st.floats(0.01, 50), st.integers(0, 2**16))
def test_symmetric_twin_equals_a_symmetric_observer_fed_the_same_data(centre: float, spread: float,
                                                                      seed: int) -> None:
    """The twin loaded from an affine observer's state has the qparams of a symmetric observer that saw the same
    batches (histogram, range and per-timestep statistics all carry over)."""
    from qdiff_ao.qconfig import activation_observer

    gen = torch.Generator().manual_seed(seed)
    batches = [centre + spread * torch.randn(3, 50, generator=gen) for _ in range(3)]
    aff = activation_observer(qdiff_ao.QuantConfig())()
    sym = activation_observer(qdiff_ao.QuantConfig(act_symmetric=True))()
    for i, b in enumerate(batches):
        with qdiff_ao.timestep_context(10 * i):
            aff(b)
            sym(b)
    twin = activation_observer(qdiff_ao.QuantConfig(act_symmetric=True))()
    twin.load_state_dict(aff.state_dict())
    s_twin, z_twin = twin.calculate_qparams()
    s_sym, z_sym = sym.calculate_qparams()
    assert torch.equal(s_twin, s_sym) and torch.equal(z_twin, z_sym) and int(z_twin) == 128
    assert twin.per_step_ranges() == sym.per_step_ranges()


@torch.no_grad()
def test_q_k_v_have_zero_point_128_and_only_they_export_as_int8_with_zero_point_0(tmp_path) -> None:
    onnx = pytest.importorskip("onnx")

    unet, prepared = calibrated_unet("attn", qdiff_ao.QuantConfig(attention_symmetric=True))
    from qdiff_ao.deploy.fake_quant_view import fake_quant_view

    converted = qdiff_ao.convert(prepared)
    view = fake_quant_view(converted)
    quantizers = [m for m in view.modules() if isinstance(m, ActivationQDQ)]
    signed = [m for m in quantizers if m.signed]
    assert len(signed) == 4 * 4 and sum(int(m.zero_point) == 128 for m in signed) == 3 * 4  # Q, K, V; softmax: 0
    int8_form = [m for m in signed if int(m.zero_point) == 128]
    path = tmp_path / "m.onnx"
    qdiff_ao.export_onnx(converted, path, unet_inputs("attn", 1))
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    weights = {i.name for i in model.graph.initializer}
    dtypes = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    # activation quantizers (a weight's QuantizeLinear reads an initializer): their codes' ONNX type
    codes = [dtypes.get(n.output[0]) for n in model.graph.node
             if n.op_type == "QuantizeLinear" and n.input[0] not in weights]
    assert codes.count(onnx.TensorProto.INT8) == len(int8_form)  # Q, K, V in the zero-point-0 INT8 form
    # every other activation stays uint8, also one whose affine zero point happens to be 128 (ORT's integer
    # conv takes uint8 inputs)
    assert codes.count(onnx.TensorProto.UINT8) == len(quantizers) - len(int8_form)


@settings(max_examples=60, deadline=None)
@given(st.floats(1e-4, 1.0), st.lists(st.floats(-300, 300, allow_nan=False), min_size=1, max_size=32),
       st.sampled_from([(0, 255), (1, 254), (64, 191)]))
def test_symmetric_uint8_qdq_equals_its_int8_form(scale: float, values: list[float], qrange: tuple[int, int]) -> None:
    """A uint8 grid with zero point 128 and its INT8 zero-point-0 form give the same numbers (clip included)."""
    x = torch.tensor(values, dtype=torch.float32)
    qdq = ActivationQDQ(torch.tensor(scale), torch.tensor(128), *qrange, (0, 255))
    qdq.signed = True
    lo, hi = qrange
    s = float(qdq.scale)
    uint8 = torch.fake_quantize_per_tensor_affine(torch.clamp(x, (lo - 128) * s, (hi - 128) * s), qdq.scale,
                                                  qdq.zero_point, 0, 255)
    assert torch.equal(qdq(x), uint8)


@torch.no_grad()
def test_openvino_runs_the_attention_matmuls_on_int8_operands() -> None:
    """With symmetric Q, K, V OpenVINO fuses each attention into a subgraph with three INT8 inputs (Q, K, V);
    with the default affine ones it does not; the measured choice (all cheap on this model) gives the first."""
    pytest.importorskip("openvino")
    if torch.backends.cpu.get_cpu_capability() == "AVX2":
        # seen on an AVX2-only AMD EPYC (2026-12-07): OpenVINO builds no INT8 attention subgraph there, with either
        # grid, so the comparison this test makes does not exist on that CPU kind
        pytest.skip("OpenVINO fuses INT8 attention only on CPUs with AVX-512 (this one is AVX2-only)")
    from qdiff_ao.deploy.openvino_runtime import OpenVINOGraph

    def int8_attention_subgraphs(cfg: qdiff_ao.QuantConfig) -> int:
        _, prepared = calibrated_unet("attn", cfg)
        if cfg.attention_symmetric == "measured":
            assert all(c.symmetric for c in choose_attention_grids(prepared))
        inputs = unet_inputs("attn", 2)
        graph = OpenVINOGraph(qdiff_ao.convert(prepared), inputs, threads=1)
        runtime = graph._request(inputs).get_compiled_model().get_runtime_model()
        count = 0
        for op in runtime.get_ordered_ops():
            types = [str(op.input(i).get_element_type()) for i in range(op.get_input_size())]
            if len(types) == 3 and all("int8" in t and "uint" not in t for t in types):
                count += 1
        return count

    attentions = len([n for n in build_unet("attn").modules() if type(n).__name__ == "Attention"])
    assert int8_attention_subgraphs(qdiff_ao.QuantConfig(attention_symmetric=True)) == attentions
    assert int8_attention_subgraphs(qdiff_ao.QuantConfig()) == 0
    assert int8_attention_subgraphs(qdiff_ao.QuantConfig(attention_symmetric="measured")) == attentions


@settings(max_examples=60, deadline=None)
@given(st.floats(1e-3, 10), st.floats(-20, 0), st.floats(0, 20), st.floats(0.01, 1), st.floats(0.01, 1))
def test_group_grid_of_a_symmetric_quantizer_stays_symmetric(step: float, lo: float, hi: float, a: float,
                                                              b: float) -> None:
    """``mapped_grid(symmetric=True)`` keeps zero point 128 and scales the step by the ratio of absolute ranges."""
    from qdiff_ao.quantizers.timestep_grids import mapped_grid

    full = (lo - 1.0, hi + 1.0)
    group = (full[0] * a, full[1] * b)
    s_g, z_g = mapped_grid((step * -128, step * 127), full, group, 0, 255, symmetric=True)
    assert z_g == 128
    ratio = max(abs(group[0]), abs(group[1])) / max(abs(full[0]), abs(full[1]))
    assert s_g == pytest.approx(max(step * ratio, 1e-8), rel=1e-9)


def test_the_operand_walk_passes_scalings_but_not_a_reciprocal() -> None:
    """``x * c``, ``c * x`` and ``x / c`` lead up to the quantizer of ``x``; ``c / x`` does not (not a scaling)."""
    import operator

    from torch import fx

    from qdiff_ao.passes.attention_operands import attention_operand_quantizers

    class Operands(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qa, self.qb = torch.nn.Identity(), torch.nn.Identity()

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            qa, qb = self.qa(a), self.qb(b)
            scaled = torch.matmul(0.5 * qa.transpose(-1, -2) / 2.0, qb * 3.0)
            reciprocal = torch.matmul(operator.truediv(1.0, qa), qb)
            return scaled, reciprocal

    gm = fx.symbolic_trace(Operands())
    is_quantizer = lambda m: isinstance(m, torch.nn.Identity)  # noqa: E731
    assert attention_operand_quantizers(gm, is_quantizer) == ["qa", "qb"]  # from the scaled matmul
    first = next(n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.matmul)
    first.target = operator.add  # no longer a matmul: only the one reading 1 / qa is left
    gm.recompile()
    assert attention_operand_quantizers(gm, is_quantizer) == []


@pytest.mark.parametrize("mode", [True, "measured"])
def test_reconstruction_keeps_the_calibrated_steps_of_symmetric_q_k_v(mode: bool | str) -> None:
    """Learning the step sizes of symmetric Q, K, V cost shapes32 FD on every seed tried: reconstruction keeps their
    calibrated steps (and zero point 128), while it still learns other activation steps (the softmax's here)."""
    cfg = qdiff_ao.QuantConfig(attention_symmetric=mode, reconstruction=qdiff_ao.ReconstructionConfig(
        weight_iters=10, act_iters=10, batch_size=4))
    unet, prepared = calibrated_unet("attn", cfg)
    if mode == "measured":
        choose_attention_grids(prepared)
    names = attention_operand_observers(prepared)
    before = {n: prepared.get_submodule(n).calculate_qparams() for n in names}
    rows = [unet_inputs("attn", 4, t=t, seed=30 + i) for i, t in enumerate((900, 300))]
    calib = qdiff_ao.CalibrationSet(torch.cat([r["sample"] for r in rows]), torch.cat([r["timestep"] for r in rows]))
    qdiff_ao.passes.reconstruct(prepared, calib, cfg.reconstruction, model=unet, progress=False)
    learned = 0
    for n in names:
        scale, zp = prepared.get_submodule(n).calculate_qparams()
        if is_softmax_observer(prepared.get_submodule(n)) or not torch.equal(before[n][1], torch.tensor(128)):
            learned += int(not torch.equal(scale, before[n][0]))
            continue
        assert torch.equal(scale, before[n][0]) and int(zp) == 128, n
    assert learned > 0  # the softmax steps were learned: step learning ran
