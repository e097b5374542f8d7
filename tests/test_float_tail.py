"""The float tail (#15): the last timesteps run with float activations on the same integer weights, chosen by
measurement (``passes.choose_float_tail``), simulated, lowered (``QuantizedUNet`` dispatches on the timestep) and
saved in checkpoints (format version 5)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

import qdiff_ao
from qdiff_ao.capture.graph_state import update_graph_info
from qdiff_ao.capture.row_parts import run_by_part
from qdiff_ao.deploy.checkpoint import CheckpointError
from qdiff_ao.deploy.checkpoint.files import read_checkpoint, write_checkpoint
from qdiff_ao.deploy.fake_quant_view import fake_quant_view
from qdiff_ao.passes import choose_float_tail
from qdiff_ao.quantizers.float_tail import FloatTail
from qdiff_ao.quantizers.qdq import ActivationQDQ
from qdiff_ao.quantizers.simulation import build_simulation
from tests.unet_factory import build_unet, unet_inputs

FAMILY = "attn"
TIMESTEPS = (900, 500, 150, 40, 10)


def _inputs(batch: int, t: int, seed: int) -> dict[str, torch.Tensor]:
    x = unet_inputs(FAMILY, batch, t=t, seed=seed)
    x["sample"] = x["sample"] * (0.05 + t / 900)  # late inputs are small, as x_t near the data
    return x


def _mixed(seed: int) -> dict[str, torch.Tensor]:
    xs = [_inputs(1, t, seed) for t in TIMESTEPS]
    return {k: torch.cat([x[k] for x in xs]) for k in xs[0]}


@pytest.fixture(scope="module")
def tailed() -> dict[str, Any]:
    """The recipe without reconstruction or fallback (speed), with a float tail: chosen by measurement with
    ``min_share`` tiny (so this random-weight UNet gets one) and the budget reaching the two last timesteps."""
    torch.manual_seed(0)
    unet = build_unet(FAMILY)
    rows = [_inputs(4, t, 100 + i) for i, t in enumerate(TIMESTEPS)]
    calib = qdiff_ao.CalibrationSet(torch.cat([r["sample"] for r in rows]), torch.cat([r["timestep"] for r in rows]))
    prepared = qdiff_ao.prepare(unet, qdiff_ao.QuantConfig(), calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, batch_size=8, progress=False)
    choose_float_tail(prepared, calib, num_train_timesteps=1000, max_fraction=0.1, min_share=1e-6)
    tail = qdiff_ao.graph_info(prepared).float_tail
    qunet = qdiff_ao.QuantizedUNet(qdiff_ao.convert(prepared), like=unet)
    return {"unet": unet, "calib": calib, "prepared": prepared, "tail": tail, "qunet": qunet}


def test_the_tail_stops_at_the_budget_and_halfway_to_the_next_timestep(tailed: dict[str, Any]) -> None:
    tail = tailed["tail"]
    assert isinstance(tail, FloatTail) and qdiff_ao.graph_info(tailed["prepared"]).float_tail == tail
    report = tail.report
    assert report["timesteps"] == [10.0, 40.0, 150.0, 500.0, 900.0] and report["budget"] == 100.0
    # 10 and 40 are inside the budget (150 is not): the boundary is halfway from 40 to 150
    assert tail.below == 95.0 and tail.holds(torch.tensor([40, 95, 96])).tolist() == [True, True, False]
    for q, w in zip(report["error_quantized"][:2], report["error_weights_only"][:2], strict=True):
        assert 0 < w < q  # float activations lower the error there


def test_no_tail_without_budget_or_when_activations_hold_little_of_the_error(tailed: dict[str, Any]) -> None:
    prepared = copy.deepcopy(tailed["prepared"])
    assert choose_float_tail(prepared, tailed["calib"], num_train_timesteps=1000, max_fraction=0.0)["below"] is None
    assert qdiff_ao.graph_info(prepared).float_tail is None
    shares = tailed["tail"].report["activation_share"]
    above = min(1.0, shares[0] + 1e-3)
    report = choose_float_tail(prepared, tailed["calib"], num_train_timesteps=1000, min_share=above)
    assert report["below"] is None and report["activation_share"] == pytest.approx(shares, abs=1e-6)
    with pytest.raises(ValueError, match="max_fraction"):
        choose_float_tail(prepared, tailed["calib"], num_train_timesteps=1000, max_fraction=1.5)


def test_simulation_runs_tail_rows_with_float_activations(tailed: dict[str, Any]) -> None:
    """Simulation.run on a mixed batch equals the tail's rows run together with float activations and the other
    rows together on the integer path (the same rows per forward: float kernels may round a batch differently)."""
    sim = build_simulation(tailed["prepared"])
    sim.gm.eval()
    mixed = _mixed(7)
    inside = tailed["tail"].holds(mixed["timestep"])
    assert 0 < int(inside.sum()) < len(TIMESTEPS)
    with torch.no_grad():
        together = sim.run(mixed)
        with sim.state.in_float_tail():
            tail_rows = sim.gm(**{k: v[inside] for k, v in mixed.items()})
        other_rows = sim.gm(**{k: v[~inside] for k, v in mixed.items()})
        integer_tail_rows = sim.gm(**{k: v[inside] for k, v in mixed.items()})
    assert torch.equal(together[inside], tail_rows) and torch.equal(together[~inside], other_rows)
    assert not torch.allclose(tail_rows, integer_tail_rows, atol=1e-4)  # the tail is not the integer path


def test_weights_only_view_has_no_activation_quantizer_and_matches_the_simulation(tailed: dict[str, Any]) -> None:
    view = fake_quant_view(tailed["qunet"].graph_module, float_activations=True)
    assert not any(isinstance(m, ActivationQDQ) for m in view.modules())
    assert not any(n.op == "call_function" and n.target is torch.quantize_per_tensor for n in view.graph.nodes)
    sim = build_simulation(tailed["prepared"])
    sim.gm.eval()
    x = _inputs(2, 10, 3)
    with torch.no_grad(), sim.state.in_float_tail():
        expected = sim.gm(**x)
        got = view(**x)
    assert float((got - expected).norm() / expected.norm()) < 1e-4  # the same W_hat: float rounding only


def test_lowered_model_dispatches_tail_rows_to_the_view(tailed: dict[str, Any]) -> None:
    """Tail rows run on the weights-only view, the others on the integer graph, split and put back in order; the
    frozen model runs the same view on the tail."""
    qunet = tailed["qunet"]
    mixed = _mixed(9)
    inside = tailed["tail"].holds(mixed["timestep"])
    plain_graph = copy.deepcopy(qunet.graph_module)
    update_graph_info(plain_graph, float_tail=None)
    plain = qdiff_ao.QuantizedUNet(plain_graph, like=tailed["unet"])
    assert plain.float_tail_below is None and qunet.float_tail_below == tailed["tail"].below
    with torch.no_grad():
        together = qunet(**mixed).sample
        assert torch.equal(together[inside], qunet._tail.view()(**{k: v[inside] for k, v in mixed.items()}))
        assert torch.equal(together[~inside], plain(**{k: v[~inside] for k, v in mixed.items()}).sample)
        frozen = copy.deepcopy(qunet).optimize_for_inference(integer_attention=False)
        assert torch.equal(frozen(**mixed).sample[inside], together[inside])


def test_checkpoint_round_trip_keeps_the_tail(tailed: dict[str, Any], tmp_path: Path) -> None:
    path = tailed["qunet"].save_pretrained(tmp_path / "ckpt")
    body = json.loads((path / "config.json").read_text())
    assert body["format_version"] == 5 and body["float_tail"] == {"below": tailed["tail"].below}
    loaded = qdiff_ao.QuantizedUNet.from_pretrained(path)
    assert loaded.float_tail_below == tailed["tail"].below
    mixed = _mixed(5)
    with torch.no_grad():
        assert torch.equal(loaded(**mixed).sample, tailed["qunet"](**mixed).sample)
    body, tensors = read_checkpoint(path)  # re-signed edits: the record itself is checked
    body = {k: v for k, v in body.items() if k not in ("tensors_bytes", "tensors_sha256")}
    for bad in ({"below": -3}, {"below": "late"}, [35.0]):
        edited = write_checkpoint(tmp_path / f"edited{len(list(tmp_path.iterdir()))}", body | {"float_tail": bad},
                                  tensors, overwrite=False)
        with pytest.raises(CheckpointError, match="float_tail"):
            qdiff_ao.QuantizedUNet.from_pretrained(edited)


def test_quantize_records_the_tail_only_when_asked(tailed: dict[str, Any]) -> None:
    kwargs: dict[str, Any] = dict(calib=tailed["calib"], batch_size=8, progress=False, reconstruct=False,
                                  precision_fallback=False, timestep_groups=1, bias_correction=False,
                                  prediction_spread=False)
    off = qdiff_ao.quantize(tailed["unet"], DDIMScheduler(), qdiff_ao.QuantConfig(), **kwargs)
    assert off.float_tail_below is None and off.quantization_info["float_tail"] is None
    on = qdiff_ao.quantize(tailed["unet"], DDIMScheduler(), qdiff_ao.QuantConfig(), float_tail=True, **kwargs)
    assert set(on.quantization_info["float_tail"]) >= {"below", "activation_share", "timesteps"}
    assert (on.float_tail_below is None) == (on.quantization_info["float_tail"]["below"] is None)


@settings(max_examples=30, deadline=None)
@given(labels=st.lists(st.integers(-1, 3), min_size=1, max_size=12))
def test_run_by_part_puts_every_row_back_in_place(labels: list[int]) -> None:
    """Each part runs on its own rows (``run`` sees only rows of its label) and the output keeps the row order."""
    n = len(labels)
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1) + 1
    inputs = {"sample": x, "scale": torch.tensor(2.0)}

    def run(label: int, sub: dict[str, Any]) -> torch.Tensor:
        assert sub["scale"].dim() == 0  # not cut
        return sub["sample"] * sub["scale"] + 100 * label

    out = run_by_part(inputs, torch.tensor(labels), run)
    assert torch.equal(out, x * 2 + 100 * torch.tensor(labels, dtype=torch.float32).reshape(n, 1))


def test_float_tail_record_refuses_bad_boundaries() -> None:
    with pytest.raises(ValueError, match="below"):
        FloatTail(-1.0)
    with pytest.raises(ValueError, match="below"):
        FloatTail(float("nan"))
    assert FloatTail(35.0).holds(torch.tensor([0, 35, 36])).tolist() == [True, True, False]


def test_onnx_export_of_a_tailed_graph_needs_consent(tailed: dict[str, Any], tmp_path: Path) -> None:
    """An ONNX file holds the integer graph only: exporting a graph with a float tail must be asked for."""
    from qdiff_ao.deploy.onnx.export import export_onnx

    graph, x = tailed["qunet"].graph_module, _inputs(1, 10, 0)
    with pytest.raises(ValueError, match="float tail"):
        export_onnx(graph, tmp_path / "unet.onnx", x)
    assert not (tmp_path / "unet.onnx").exists()
    pytest.importorskip("onnx")
    export_onnx(graph, tmp_path / "unet.onnx", x, ignore_float_tail=True)
    assert (tmp_path / "unet.onnx").stat().st_size > 0


def test_cli_offers_the_float_tail_opt_in() -> None:
    from qdiff_ao.app.cli import build_parser

    assert build_parser().parse_args(["quantize", "--float-tail"]).float_tail is True
    assert build_parser().parse_args(["quantize"]).float_tail is False
