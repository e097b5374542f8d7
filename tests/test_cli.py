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
    assert main(["quantize", "--model", str(tmp_path / "notamodel"), "--out", str(tmp_path / "o"),
                 "--reconstruction-candidates", "1"]) == 2  # refused before the model is read
    assert "--reconstruction-candidates must be >= 2" in capsys.readouterr().err


def test_quantize_tiny_model_end_to_end(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    unet = build_unet("attn")
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    args = ["quantize", "--model", str(tmp_path / "model"), "--out", str(out), "--calibration-steps", "10",
            "--calibration-timesteps", "5", "--samples-per-timestep", "4", "--recon-iters", "0",
            "--num-samples", "8", "--sampling-steps", "4", "--attention-grids", "measured", "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["scheme"] == "W4A8" and report["splits"] == 4 and report["calibration_device"] == "cpu"
    assert report["checkpoint_bytes"] < report["fp32_safetensors_bytes"]
    assert report["precision_fallback"]["forwards"] > 0 and report["output_correction"]["method"] == "timestep_groups"
    assert report["sensitivity"]["rows"][0]["worst"] >= report["sensitivity"]["rows"][-1]["worst"]
    grids = report["attention_grids"]  # the measured choice: one entry per Q, K, V quantizer
    assert report["config"]["attention_symmetric"] == "measured" and len(grids) == 3 * 4
    assert all(g["symmetric"] == (g["cost_bits"] <= 0.5) for g in grids)
    assert "Attention Q/K/V grids (measured)" in (out / "report.md").read_text()
    spread = report["prediction_spread"]  # fitted on DDIM runs of min(50, calibration steps) = 10 steps
    assert spread["num_inference_steps"] == 10 and isinstance(spread["kept"], bool)
    assert "Denoised-spread correction: " in (out / "report.md").read_text()
    for name in ("samples_fp.png", "samples_quantized.png", "activation_ranges.png", "split_histograms.png",
                 "sensitivity.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    # The checkpoint reloads and runs.
    from qdiff_ao import load

    qunet = load(out / "pipeline" / "unet")
    assert qunet(torch.randn(2, 3, 16, 16), 10).sample.shape == (2, 3, 16, 16)
    # A second run refuses to overwrite the earlier output without --overwrite.
    assert main(args) == 2
    # An interrupted --overwrite run (after its new checkpoint was written) leaves the previous output whole.
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def interrupt(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("qdiff_ao.app.main_job.ddim_sample", interrupt)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--overwrite", "--weight-bits", "8", "--no-sensitivity"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert not list(tmp_path.glob(".out.*")), "a staging folder was left behind"


@pytest.mark.parametrize("option,value,phrase", [
    ("--samples-per-timestep", "0", "--samples-per-timestep must be >= 1"),
    ("--num-samples", "0", "--num-samples must be >= 1"),
    ("--sampling-steps", "0", "--sampling-steps must be >= 1"),
    ("--recon-iters", "-5", "--recon-iters must be >= 0"),
    ("--threads", "-1", "--threads must be >= 1"),
    ("--seed", "-1", "--seed must be >= 0"),
    ("--calibration-timesteps", "500", "cannot exceed --calibration-steps"),
    ("--weight-bits", "1", "weight_bits"),
    ("--device", "mps", "calibration runs on cpu or cuda"),
    ("--device", "no such device", "--device must name a torch device"),
    *([("--device", "cuda", "sees no CUDA device")] if not torch.cuda.is_available() else []),
])
def test_bad_options_fail_before_any_work(tmp_path, capsys: pytest.CaptureFixture[str], option: str, value: str,
                                          phrase: str) -> None:
    out = tmp_path / "out"
    assert main(["quantize", "--out", str(out), option, value, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qdiff-ao quantize: error:") and phrase in err, err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_folders_and_files_fail_cleanly(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    unet = build_unet("attn")
    model = tmp_path / "model"
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(model)
    (tmp_path / "a_file").write_text("mine")
    cases = []
    broken = tmp_path / "broken"
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(broken)
    (broken / "unet" / "config.json").write_text("{not json")
    cases.append((["--model", str(broken)], "not a readable JSON config"))
    no_weights = tmp_path / "no_weights"
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(no_weights)
    for f in (no_weights / "unet").glob("*.safetensors"):
        f.unlink()
    cases.append((["--model", str(no_weights)], "cannot load the model"))
    no_scheduler = tmp_path / "no_scheduler"
    DDPMPipeline(unet=unet, scheduler=DDIMScheduler()).save_pretrained(no_scheduler)
    (no_scheduler / "scheduler" / "scheduler_config.json").unlink()
    cases.append((["--model", str(no_scheduler)], "scheduler_config.json is missing"))
    cases.append((["--model", str(model), "--out", str(tmp_path / "a_file")], "is a file"))
    user_dir = tmp_path / "user_dir"
    user_dir.mkdir()
    (user_dir / "thesis.tex").write_text("mine")
    cases.append((["--model", str(model), "--out", str(user_dir), "--overwrite"], "did not write"))
    for extra, phrase in cases:
        argv = ["quantize", "--out", str(tmp_path / "out"), *extra, "--quiet"]
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("qdiff-ao quantize: error:") and phrase in err, (extra, err)
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "a_file").read_text() == "mine" and (user_dir / "thesis.tex").read_text() == "mine"


def test_output_moved_aside_by_a_killed_publish_is_put_back(tmp_path) -> None:
    from qdiff_ao.app.output_folder import check_output_target

    out = tmp_path / "out"
    aside = tmp_path / ".out.old-1234"
    aside.mkdir()
    (aside / "report.json").write_text("{}")
    stale = tmp_path / ".out.old-5678"  # a second leftover of ours: removed
    stale.mkdir()
    (stale / "report.md").write_text("old")
    mine = tmp_path / ".out.old-9999"  # holds a file qdiff-ao does not write: left alone
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--overwrite"):
        check_output_target(out, overwrite=False)  # the earlier output is back, so it needs --overwrite
    assert (out / "report.json").read_text() == "{}"
    assert not aside.exists() and not stale.exists() and (mine / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(("flag", "expected"), [((), True), (("--no-prediction-spread",), False)])
def test_prediction_spread_flag_reaches_quantize(tmp_path, monkeypatch: pytest.MonkeyPatch, flag: tuple[str, ...],
                                                 expected: bool) -> None:
    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def record(*_: object, **kwargs: object) -> None:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr("qdiff_ao.app.main_job.workflow.quantize", record)
    with pytest.raises(Stop):
        main(["quantize", "--out", str(tmp_path / "out"), "--quiet", *flag])
    assert seen["prediction_spread"] is expected
