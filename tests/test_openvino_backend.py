"""OpenVINO as a backend: ``QuantizedUNet.optimize_for_inference(backend="openvino")`` on every test UNet family.

Checked against the fake-quant view of the same converted graph (what the Q/DQ graph computes). Tolerance as in
test_onnx_export.py: through a random-weight UNet a 1-LSB difference at one quantizer (another engine's float
summation order) moves a GroupNorm group's statistics and flips codes downstream, so engines differ by a few
percent relative L2 (measured here: 3.6-5.1 % vs the view, fbgemm 2.0-4.2 %); the bound is that, and below the
quantization error itself. The structural check is exact: OpenVINO's executed graph runs every quantized conv
and linear layer in u8.
"""

from __future__ import annotations

import argparse
import bisect
import warnings

import pytest
import torch
from diffusers import DDIMScheduler

import qdiff_ao
from qdiff_ao.app import main_job
from qdiff_ao.deploy.fake_quant_view import fake_quant_view
from qdiff_ao.deploy.timestep_dispatch import without_groups
from tests.test_timestep_groups import TIMESTEPS
from tests.test_timestep_groups import _inputs as _drifting_inputs
from tests.unet_factory import FAMILIES, build_unet, calibrated_unet, unet_inputs

ov = pytest.importorskip("openvino")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _quantized_layers(gm: torch.fx.GraphModule) -> dict[str, int]:
    import torch.ao.nn.quantized as nnq

    return {"Convolution": sum(isinstance(m, nnq.Conv2d) for m in gm.modules()),
            "FullyConnected": sum(isinstance(m, nnq.Linear) for m in gm.modules())}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_openvino_runs_the_simulation_on_int8_kernels(family: str) -> None:
    unet, prepared = calibrated_unet(family, qdiff_ao.QuantConfig(weight_bits=4, act_bits=8))
    converted = qdiff_ao.convert(prepared)
    view = fake_quant_view(converted)
    qunet = qdiff_ao.QuantizedUNet(converted, like=unet).eval().optimize_for_inference(backend="openvino")
    assert qunet.backend == "openvino" and qunet.optimized
    for batch in (1, 3):  # any batch size (compiled per shape)
        x = unet_inputs(family, batch, t=400, seed=5)
        with torch.no_grad():
            ref, fp = view(**x), unet(**x).sample
            out = qunet(**x).sample
        assert out.shape == fp.shape
        assert _rel(out, ref) < min(0.08, _rel(ref, fp)), (_rel(out, ref), _rel(ref, fp))
    int8 = qunet._frozen[0].int8_layers(unet_inputs(family, 1))
    expected = _quantized_layers(converted)
    assert {k: int8.get(k, 0) for k in expected} == expected, int8


def test_weights_only_model_runs_on_openvino_with_its_integer_weights() -> None:
    """act_bits=None lowers to float layers holding integer weight codes (no activation quantizers): the view
    translates them to weight Q/DQ, and OpenVINO's output equals the lowered graph's up to float rounding."""
    unet, prepared = calibrated_unet("attn", qdiff_ao.QuantConfig(weight_bits=4, act_bits=None))
    converted = qdiff_ao.convert(prepared)
    qunet = qdiff_ao.QuantizedUNet(converted, like=unet).eval().optimize_for_inference(backend="openvino")
    x = unet_inputs("attn", 2)
    with torch.no_grad():
        ref, out, fp = converted(**x), qunet(**x).sample, unet(**x).sample
    ref = ref.sample if hasattr(ref, "sample") else ref
    assert _rel(out, ref) < 1e-4, _rel(out, ref)
    assert _rel(out, fp) > 1e-3  # the 4-bit weights are in effect, not the float ones


def test_openvino_backend_keeps_the_input_checks_and_the_checkpoint(tmp_path: object) -> None:
    unet, prepared = calibrated_unet("cross_attn", qdiff_ao.QuantConfig(weight_bits=4, act_bits=8))
    qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet).eval()
    qunet.optimize_for_inference(backend="openvino", threads=1)
    x = unet_inputs("cross_attn", 2)
    with pytest.raises(TypeError, match="encoder_hidden_states"):
        qunet(x["sample"], x["timestep"])
    with pytest.raises(ValueError):
        qunet(x["sample"][:, :2], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"])
    bad = x["sample"].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        qunet(bad, x["timestep"], encoder_hidden_states=x["encoder_hidden_states"])
    out = qunet(x["sample"], 400, encoder_hidden_states=x["encoder_hidden_states"], return_dict=False)[0]
    assert torch.isfinite(out).all()
    path = qunet.save_pretrained(tmp_path / "unet")  # type: ignore[operator]
    loaded = qdiff_ao.QuantizedUNet.from_pretrained(path).optimize_for_inference(backend="openvino")
    again = loaded(x["sample"], 400, encoder_hidden_states=x["encoder_hidden_states"]).sample
    assert torch.equal(again, out)  # same checkpoint numbers, same engine


def test_unknown_backend_and_bad_threads() -> None:
    unet, prepared = calibrated_unet("attn", qdiff_ao.QuantConfig(weight_bits=8, act_bits=8))
    qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet).eval()
    with pytest.raises(ValueError, match="backend must be one of"):
        qunet.optimize_for_inference(backend="tensorrt")
    with pytest.raises(ValueError, match="threads"):
        qunet.optimize_for_inference(backend="openvino", threads=0)


def test_openvino_runs_each_timestep_group_with_its_qparams() -> None:
    """A grouped QuantizedUNet on OpenVINO: each timestep runs its group's compiled graph, which follows that
    group's simulation."""
    torch.manual_seed(0)
    rows = [_drifting_inputs(6, t, 100 + i) for i, t in enumerate(TIMESTEPS)]
    calib = qdiff_ao.CalibrationSet(torch.cat([r["sample"] for r in rows]), torch.cat([r["timestep"] for r in rows]))
    qunet = qdiff_ao.quantize(build_unet("attn"), DDIMScheduler(), qdiff_ao.QuantConfig(), calib=calib,
                              batch_size=8, progress=False, reconstruct=False, precision_fallback=False,
                              timestep_groups=4)
    assert len(qunet._graphs) > 1, "the drifting calibration set should keep at least one group"
    views = [fake_quant_view(without_groups(gm)) for gm in qunet._graphs]
    qunet.optimize_for_inference(backend="openvino")
    used = set()
    for t in TIMESTEPS:
        k = qunet._graph_index[bisect.bisect_right(qunet.timestep_group_boundaries, float(t))]
        used.add(k)
        x = _drifting_inputs(2, t, 7)
        with torch.no_grad():
            ref, out = views[k](**x), qunet(**x).sample
        assert _rel(out, ref) < 0.08, (t, k, _rel(out, ref))
    assert len(used) > 1


def test_cli_backend_openvino_needs_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setattr(main_job, "openvino_available", lambda: False)
    args = argparse.Namespace(calibration_steps=10, calibration_timesteps=2, samples_per_timestep=2, sampling_steps=2,
                              threads=None, num_samples=None, seed=0, recon_iters=None, guidance_scale=7.5,
                              prompts=None, out=tmp_path, overwrite=False, backend="openvino")
    with warnings.catch_warnings(), pytest.raises(main_job.MainJobError, match=r"qdiff_ao\[openvino\]"):
        main_job.check_args(args, check_output=False)
