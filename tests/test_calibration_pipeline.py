"""Integration: collect (DDIM trajectory) -> trace -> split -> prepare -> calibrate -> convert, with drift reports."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

import qdiff_ao
from qdiff_ao.calibration.range_report import (
    activation_ranges,
    format_ranges_table,
    plot_activation_ranges,
    plot_split_histograms,
)
from tests.unet_factory import build_unet


def test_timestep_aware_calibration_end_to_end_records_drift(tmp_path) -> None:
    unet = build_unet("attn")
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    calib = qdiff_ao.collect_calibration_data(unet, scheduler, num_inference_steps=10, num_timesteps=5,
                                              samples_per_timestep=4, batch_size=4, seed=0, progress=False)
    assert len(calib.timesteps()) == 5
    cfg = qdiff_ao.QuantConfig(weight_bits=4, act_bits=8)
    prepared = qdiff_ao.prepare(unet, cfg, calib.example_inputs(2))
    qdiff_ao.calibrate(prepared, calib, batch_size=4, progress=False)

    rows = activation_ranges(prepared)
    assert rows and all(len(r["steps"]) == 5 for r in rows)
    assert set(rows[0]["steps"]) == set(calib.timesteps())
    # The report is the data: the observer of the graph input saw x_t itself, so its per-step ranges and drift
    # must equal those computed from the calibration set directly (x_t shrinks from noise towards the data).
    sample_row = next(r for r in rows if r["value"] == "sample")
    expected = {}
    for t in calib.timesteps():
        x = calib.sample[calib.timestep == t]
        expected[t] = (float(x.min()), float(x.max()))
    assert sample_row["steps"].keys() == expected.keys()
    for t, (lo, hi) in expected.items():
        assert sample_row["steps"][t] == (lo, hi)
    widths = [hi - lo for lo, hi in expected.values()]
    assert sample_row["drift"] == max(widths) / min(widths) > 1.05
    assert "| `" in format_ranges_table(rows)

    png = tmp_path / "ranges.png"
    assert len(plot_activation_ranges(prepared, png, top=4)) == 4 and png.stat().st_size > 1000
    hist_png = tmp_path / "split.png"
    convs = plot_split_histograms(prepared, calib.example_inputs(4), hist_png, top=2)
    assert convs and hist_png.stat().st_size > 1000

    quantized = qdiff_ao.convert(prepared)
    with torch.no_grad():
        out = quantized(**calib.example_inputs(3))
    assert out.shape == (3, 3, 16, 16) and bool(torch.isfinite(out).all())
