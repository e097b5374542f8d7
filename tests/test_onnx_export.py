"""ONNX QDQ export checked with ONNX Runtime on CPU: structure, integer-kernel fusion, numerics.

Tolerances: a tiny conv net without normalisation has no cascade, so ORT's float evaluation of the QDQ graph must
reproduce the torch fake-quant copy to within 1 output LSB. Through a random-weight UNet, any 1-LSB difference at
one quantizer (from a different float summation order) shifts the GroupNorm statistics of a whole group and flips
more codes downstream; measured there (batch 3): ORT vs the fake-quant copy 1.7-3.6 % relative L2, ORT's integer
kernels vs our fbgemm lowering 4.2-4.8 %, quantization error itself (fake-quant vs float) 4-18 %.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import qdiff_ao  # noqa: E402
from qdiff_ao.deploy.onnx.export import export_onnx, to_fake_quant_graph  # noqa: E402
from qdiff_ao.deploy.onnx.graph_edit import constant_arrays  # noqa: E402
from tests.unet_factory import calibrated_unet, unet_inputs  # noqa: E402


class SkipNet(nn.Module):
    """Two convs, a skip concat (split by prepare), a linear head; no normalisation.

        x ─ conv_a ─ silu ─┬─────────────────────┐
                           └─ conv_b ─ silu ─── cat ─ conv_c (split: part0 + part1) ─ mean ─ fc
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_c = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(self.conv_a(x))
        h = torch.cat([a, self.act(self.conv_b(a))], dim=1)
        return self.fc(self.conv_c(h).mean(dim=(2, 3)))


def _session(path: str | Path, optimize: bool = True) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {k: v.numpy() for k, v in inputs.items()})[0])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _skipnet(cfg: qdiff_ao.QuantConfig) -> tuple[nn.Module, torch.fx.GraphModule]:
    torch.manual_seed(0)
    net = SkipNet().eval()
    prepared = qdiff_ao.prepare(net, cfg, {"x": torch.randn(2, 3, 8, 8)})
    with torch.no_grad():
        for seed in range(3):
            prepared(x=torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)))
    return net, prepared


def _activation_observers(prepared: torch.fx.GraphModule) -> list[str]:
    from qdiff_ao._compat import ObserverBase

    return [str(n.target) for n in prepared.graph.nodes if n.op == "call_module"
            and isinstance(prepared.get_submodule(str(n.target)), ObserverBase)
            and prepared.get_submodule(str(n.target)).dtype in (torch.quint8, torch.qint8)]


def _weight_qdq(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(Q, DQ) pairs whose Q input is a constant: the weight quantizers."""
    consts = constant_arrays(model.graph)
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    return [(q, users[q.output[0]][0]) for q in model.graph.node
            if q.op_type == "QuantizeLinear" and q.input[0] in consts]


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_skipnet_qdq_placement_codes_and_metadata(tmp_path: Path, weight_bits: int) -> None:
    """One Q/DQ per activation observer and per quantized layer (split halves included); int8 per-channel
    weights whose codes respect the observer range; 4-bit range recorded in metadata_props."""
    cfg = qdiff_ao.QuantConfig(weight_bits=weight_bits, act_bits=8, timestep_aware=False)
    _, prepared = _skipnet(cfg)
    path = tmp_path / "skipnet.onnx"
    report = export_onnx(prepared, path, {"x": torch.randn(2, 3, 8, 8)})
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    observers = _activation_observers(prepared)
    layers = {"conv_a", "conv_b", "conv_c.part0", "conv_c.part1", "fc"}
    assert set(report.weight_ranges) == layers
    assert report.activation_qdq == len(observers) and report.weight_qdq == len(layers)
    assert ops["QuantizeLinear"] == len(observers) + len(layers)
    # Activation Q nodes carry the observer's name (TorchScript scope) and its qparams.
    consts = constant_arrays(model.graph)
    act_q = {n.name.split("/")[1]: n for n in model.graph.node
             if n.op_type == "QuantizeLinear" and n.input[0] not in consts}
    assert set(act_q) == set(observers)
    for name, node in act_q.items():
        scale, zero_point = prepared.get_submodule(name).calculate_qparams()
        assert float(consts[node.input[1]]) == pytest.approx(float(scale), rel=1e-6)
        assert int(consts[node.input[2]]) == int(zero_point) and consts[node.input[2]].dtype.name == "uint8"
    qmin, qmax = cfg.weight_qrange()
    pairs = _weight_qdq(model)
    assert len(pairs) == len(layers)
    for q, dq in pairs:
        w, s, z = (consts[q.input[i]] for i in range(3))
        assert z.dtype.name == "int8" and int(abs(z).max()) == 0 and s.shape == (w.shape[0],)
        assert {a.name: a.i for a in q.attribute}["axis"] == 0
        codes = (torch.tensor(w) / torch.tensor(s).reshape(-1, *[1] * (w.ndim - 1))).round()
        assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
        assert any(user.op_type in ("Conv", "Gemm", "MatMul", "Transpose")
                   for user in model.graph.node if dq.output[0] in user.input)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["qdiff_ao.weight_ranges"]) == {k: [qmin, qmax] for k in layers}
    assert json.loads(meta["qdiff_ao.weight_code_ranges"]) == [[qmin, qmax]]
    assert json.loads(meta["qdiff_ao.config"])["weight_bits"] == weight_bits
    assert report.quantized_biases == 4  # conv_a, conv_b, conv_c.part0, fc (part1 has no bias)


@pytest.mark.parametrize("weight_bits", [8, 4])
def test_skipnet_ort_matches_fake_quant_and_lowered(tmp_path: Path, weight_bits: int) -> None:
    """No cascade in this net: ORT's float QDQ evaluation is within 1 output LSB of the torch fake-quant copy;
    ORT's integer kernels (QLinearConv, QGemm) within 2 LSB of our fbgemm lowering."""
    cfg = qdiff_ao.QuantConfig(weight_bits=weight_bits, act_bits=8, timestep_aware=False)
    _, prepared = _skipnet(cfg)
    path = tmp_path / "skipnet.onnx"
    export_onnx(prepared, path, {"x": torch.randn(2, 3, 8, 8)})
    fake_quant, _ = to_fake_quant_graph(prepared)
    lowered = qdiff_ao.convert(prepared)
    out_scale = float(prepared.get_submodule(_activation_observers(prepared)[-1]).calculate_qparams()[0])
    x = {"x": torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(9))}
    with torch.no_grad():
        ref, low = fake_quant(**x), lowered(**x)
    float_ort = _run(_session(path, optimize=False), x)
    int_session = _session(path)
    int_ort = _run(int_session, x)
    assert float((float_ort - ref).abs().max()) <= out_scale * 1.001
    assert float((int_ort - low).abs().max()) <= 2 * out_scale * 1.001
    assert _rel(int_ort, low) < 0.01


def test_skipnet_ort_fuses_integer_kernels(tmp_path: Path) -> None:
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8, timestep_aware=False)
    _, prepared = _skipnet(cfg)
    path = tmp_path / "skipnet.onnx"
    export_onnx(prepared, path, {"x": torch.randn(2, 3, 8, 8)})
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert ops["QLinearConv"] == 4 and ops["QGemm"] == 1 and ops["Conv"] == 0, ops


def test_narrow_activation_range_and_signed_codes(tmp_path: Path) -> None:
    """7-bit activations ([0, 127] under reduce_range="activations") get a Clip before Q; signed re-encoding
    (int8 codes q - 128) changes no output value."""
    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, reduce_range="activations", timestep_aware=False)
    _, prepared = _skipnet(cfg)
    x = {"x": torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))}
    unsigned = export_onnx(prepared, tmp_path / "u.onnx", {"x": x["x"]})
    signed = export_onnx(prepared, tmp_path / "s.onnx", {"x": x["x"]}, signed_activations=True)
    model = onnx.load(str(tmp_path / "s.onnx"))
    consts = constant_arrays(model.graph)
    producer = {o: n for n in model.graph.node for o in n.output}
    act_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in consts]
    assert len(act_q) == signed.activation_qdq == unsigned.activation_qdq
    assert all(consts[n.input[2]].dtype.name == "int8" for n in act_q)
    assert all(producer[n.input[0]].op_type == "Clip" for n in act_q)
    fake_quant, _ = to_fake_quant_graph(prepared)
    with torch.no_grad():
        ref = fake_quant(**x)
    a, b = _run(_session(tmp_path / "u.onnx", False), x), _run(_session(tmp_path / "s.onnx", False), x)
    assert torch.equal(a, b)
    out_scale = float(prepared.get_submodule(_activation_observers(prepared)[-1]).calculate_qparams()[0])
    assert float((a - ref).abs().max()) <= out_scale * 1.001


def test_weights_only_exports_weight_qdq_only(tmp_path: Path) -> None:
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=None, timestep_aware=False)
    _, prepared = _skipnet(cfg)
    report = export_onnx(prepared, tmp_path / "w.onnx", {"x": torch.randn(2, 3, 8, 8)})
    assert report.activation_qdq == 0 and report.weight_qdq == 5 and report.quantized_biases == 0
    x = {"x": torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))}
    with torch.no_grad():
        lowered = qdiff_ao.convert(prepared)(**x)
    assert torch.allclose(_run(_session(tmp_path / "w.onnx"), x), lowered, rtol=1e-4, atol=1e-5)


def test_bad_arguments(tmp_path: Path) -> None:
    cfg = qdiff_ao.QuantConfig(weight_bits=8, act_bits=8, timestep_aware=False)
    net, prepared = _skipnet(cfg)
    x = {"x": torch.randn(2, 3, 8, 8)}
    with pytest.raises(ValueError, match="opset"):
        export_onnx(prepared, tmp_path / "a.onnx", x, opset=11)
    with pytest.raises(ValueError, match="missing \\['x'\\]"):
        export_onnx(prepared, tmp_path / "a.onnx", {"sample": x["x"]})
    with pytest.raises(TypeError, match="GraphModule"):
        export_onnx(net, tmp_path / "a.onnx", x)  # type: ignore[arg-type]
    fresh = qdiff_ao.prepare(SkipNet().eval(), cfg, x)
    with pytest.raises(ValueError, match="has no qparams .*run qdiff_ao.calibrate"):
        export_onnx(fresh, tmp_path / "a.onnx", x)


def _unet_case(family: str, weight_bits: int, tmp_path: Path, softmax_bits: int = 8) -> dict[str, object]:
    cfg = qdiff_ao.QuantConfig(weight_bits=weight_bits, act_bits=8, softmax_bits=softmax_bits)
    unet, prepared = calibrated_unet(family, cfg)
    path = tmp_path / f"{family}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = export_onnx(prepared, path, unet_inputs(family, 2))
    fake_quant, _ = to_fake_quant_graph(prepared)
    n_layers = sum(1 for n in prepared.graph.nodes if n.op == "call_module"
                   and type(prepared.get_submodule(str(n.target))) in (nn.Conv2d, nn.Linear))
    lowered = qdiff_ao.convert(prepared)
    return dict(cfg=cfg, unet=unet, path=path, report=report, fake_quant=fake_quant, lowered=lowered,
                n_layers=n_layers)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["attn", "cross_attn"])
@pytest.mark.parametrize("weight_bits", [8, 4])
def test_unet_qdq_export_runs_in_ort(tmp_path: Path, family: str, weight_bits: int) -> None:
    """Tiny UNets, W8A8 / W4A8: Q/DQ count, integer-kernel fusion, dynamic batch, numerics vs torch."""
    case = _unet_case(family, weight_bits, tmp_path)
    report, path = case["report"], case["path"]
    model = onnx.load(str(path))
    ops = Counter(n.op_type for n in model.graph.node)
    assert report.weight_qdq == case["n_layers"]  # every conv / linear, split halves included
    assert ops["QuantizeLinear"] == report.activation_qdq + report.weight_qdq
    qmin, qmax = case["cfg"].weight_qrange()
    consts = constant_arrays(model.graph)
    for q, _ in _weight_qdq(model):
        w, s = consts[q.input[0]], consts[q.input[1]]
        codes = (torch.tensor(w) / torch.tensor(s).reshape(-1, *[1] * (w.ndim - 1))).round()
        assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    fused = Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert fused["QLinearConv"] == ops["Conv"] and fused["Conv"] == 0, fused  # every conv on integer kernels
    int_session, float_session = _session(path), _session(path, optimize=False)
    for batch in (1, 3):
        x = unet_inputs(family, batch, t=500, seed=7)
        with torch.no_grad():
            ref, low, fp = case["fake_quant"](**x), case["lowered"](**x), case["unet"](**x).sample
        int_ort, float_ort = _run(int_session, x), _run(float_session, x)
        assert int_ort.shape == fp.shape
        quant_error = _rel(ref, fp)
        assert _rel(float_ort, ref) < min(0.05, quant_error), (_rel(float_ort, ref), quant_error)
        assert _rel(int_ort, low) < 0.08, _rel(int_ort, low)


@pytest.mark.slow
def test_unet_16bit_softmax_exports_as_float_fake_quant(tmp_path: Path) -> None:
    """16-bit softmax codes have no ONNX type at opset 17: float arithmetic instead of Q/DQ, same values."""
    case = _unet_case("attn", 8, tmp_path, softmax_bits=16)
    report = case["report"]
    assert report.float_fake_quant == 4  # one per softmax of the attn UNet
    model = onnx.load(str(case["path"]))
    assert not any("softmax_observer" in n.name for n in model.graph.node if n.op_type == "QuantizeLinear")
    x = unet_inputs("attn", 2, t=300, seed=3)
    with torch.no_grad():
        ref = case["fake_quant"](**x)
    assert _rel(_run(_session(case["path"], optimize=False), x), ref) < 0.05
