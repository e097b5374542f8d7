"""The qdiff-ao command line: help, info, clear errors, and a fast end-to-end quantize run on a tiny model folder."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline

from qdiff_ao.app.cli import main
from tests.unet_factory import build_unet


def test_help_and_info(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "quantize" in capsys.readouterr().out
    assert main(["info"]) == 0
    assert "quantized engines" in capsys.readouterr().out


def test_bad_model_folder_is_a_clear_error(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["quantize", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notamodel").mkdir()
    assert main(["quantize", "--model", str(tmp_path / "notamodel"), "--out", str(tmp_path / "o")]) == 2
    assert "no unet/ subfolder" in capsys.readouterr().err


def test_quantize_tiny_model_end_to_end(tmp_path) -> None:
    unet = build_unet("attn")
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["quantize", "--model", str(tmp_path / "model"), "--out", str(out), "--calibration-steps", "10",
            "--calibration-timesteps", "5", "--samples-per-timestep", "4", "--recon-iters", "0",
            "--num-samples", "8", "--sampling-steps", "4", "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scheme"] == "W4A8" and report["splits"] == 4
    assert report["checkpoint_bytes"] < report["fp32_safetensors_bytes"]
    for name in ("samples_fp.png", "samples_quantized.png", "activation_ranges.png", "split_histograms.png",
                 "report.md"):
        assert (out / name).stat().st_size > 0, name
    # The checkpoint reloads and runs.
    from qdiff_ao import load

    qunet = load(out / "checkpoint")
    assert qunet(torch.randn(2, 3, 16, 16), 10).sample.shape == (2, 3, 16, 16)
    # A second run refuses to overwrite the checkpoint without --overwrite.
    assert main(args) == 2
