"""Whole diffusers pipelines through ``qdiff-ao quantize``: pipeline folders in, a loadable pipeline folder out.

The pipelines are tiny and built from configs (tests/pipeline_factory.py): a DDPMPipeline and a
StableDiffusionPipeline with a 2-layer CLIP text encoder and a tokenizer over a vocabulary written by the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from qdiff_ao import QuantizedUNet
from qdiff_ao.app.cli import main
from tests.pipeline_factory import save_text_to_image_pipeline, save_unconditional_pipeline

FAST = ["--calibration-steps", "6", "--calibration-timesteps", "3", "--samples-per-timestep", "2",
        "--recon-iters", "0", "--sampling-steps", "3", "--quiet"]


def _front_matter(card: str) -> dict[str, object]:
    """The YAML header of a model card, parsed for the subset the card writer uses (scalars, a list of tags)."""
    assert card.startswith("---\n"), card[:80]
    header = card.split("---\n")[1]
    fields: dict[str, object] = {}
    for line in header.splitlines():
        if line.startswith("- "):
            tags = fields.setdefault("tags", [])
            assert isinstance(tags, list)
            tags.append(json.loads(line[2:]))
        elif not line.endswith(":"):
            key, value = line.split(": ", 1)
            fields[key] = json.loads(value) if value.startswith('"') else value
    return fields


def _load(folder: Path) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_unconditional_pipeline_in_and_out(tmp_path: Path) -> None:
    source = save_unconditional_pipeline(tmp_path / "ddpm")
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(source), "--out", str(out), "--num-samples", "4", *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    folder = out / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["qdiff_ao", "QuantizedUNet"]
    # The scheduler is the source's, byte for byte.
    assert (folder / "scheduler" / "scheduler_config.json").read_bytes() == \
        (source / "scheduler" / "scheduler_config.json").read_bytes()
    pipe = _load(folder)
    assert isinstance(pipe.unet, QuantizedUNet)
    images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                  output_type="np").images
    assert images.shape == (2, 16, 16, 3) and bool((images >= 0).all() and (images <= 1).all())
    # The card carries the run's own figures and the usual header.
    card = (folder / "README.md").read_text()
    header = _front_matter(card)
    assert header["library_name"] == "diffusers" and header["pipeline_tag"] == "unconditional-image-generation"
    assert header["base_model"] == "ddpm"
    assert {"quantized", "w4a8", "int8", "int4"} <= set(header["tags"])  # type: ignore[arg-type]
    assert f"{report['checkpoint_bytes']:,}" in card and f"{report['noise_prediction_error_mean']:.4f}" in card
    # Saving the loaded pipeline again keeps the quantized UNet loadable (diffusers' own saver).
    pipe.save_pretrained(tmp_path / "resaved")
    assert json.loads((tmp_path / "resaved" / "model_index.json").read_text())["unet"] == ["qdiff_ao", "QuantizedUNet"]
    assert isinstance(_load(tmp_path / "resaved").unet, QuantizedUNet)


def test_text_to_image_pipeline_in_and_out(tmp_path: Path) -> None:
    source = save_text_to_image_pipeline(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n# a comment line\na blue square on grass\n")
    out = tmp_path / "out"
    argv = ["quantize", "--model", str(source), "--out", str(out), "--prompts", str(prompts),
            "--guidance-scale", "3", "--negative-prompt", "blurry", "--num-samples", "2", "--no-sensitivity", *FAST]
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "text-to-image"
    assert report["calibration"]["prompts"] == ["a red circle", "a blue square on grass"]
    assert report["calibration"]["guidance_scale"] == 3.0 and report["calibration"]["negative_prompt"] == "blurry"
    assert 0 < report["noise_prediction_error_mean"] < 1 and report["checkpoint_bytes"] < report[
        "fp32_safetensors_bytes"]
    folder = out / "pipeline"
    for component in ("vae", "text_encoder", "tokenizer", "scheduler"):
        for f in (source / component).rglob("*"):
            if f.is_file():
                assert (folder / component / f.relative_to(source / component)).read_bytes() == f.read_bytes()
    card = (folder / "README.md").read_text()
    assert _front_matter(card)["pipeline_tag"] == "text-to-image" and "2 prompts" in card
    pipe = _load(folder)
    assert isinstance(pipe.unet, QuantizedUNet)

    def sample(prompt: str) -> torch.Tensor:
        return pipe(prompt, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                    output_type="pt").images

    first, second = sample("a red circle"), sample("a blue square on grass")
    assert first.shape == (1, 3, 16, 16) and bool(torch.isfinite(first).all())
    assert float((first - second).abs().max()) > 1e-3, "two prompts gave the same image: the text is ignored"
    assert (out / "samples_quantized.png").stat().st_size > 0


def _expect_refusal(argv: list[str], phrase: str, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()  # drop what building the test folders printed
    assert main(["quantize", "--out", str(out), *argv, *FAST]) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("qdiff-ao quantize: error:") and phrase in err, (argv, err)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "something was written"


def test_bad_pipeline_folders_and_prompts_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sd = save_text_to_image_pipeline(tmp_path / "sd")
    out = tmp_path / "out"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# only a comment\n   \n")
    _expect_refusal(["--model", str(sd), "--prompts", str(empty)], "holds no prompt", out, capsys)
    _expect_refusal(["--model", str(sd), "--prompts", str(tmp_path / "nope.txt")], "does not exist", out, capsys)
    ddpm = save_unconditional_pipeline(tmp_path / "ddpm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    _expect_refusal(["--model", str(ddpm), "--prompts", str(prompts)], "only apply to text-to-image", out, capsys)
    index = json.loads((sd / "model_index.json").read_text())
    (sd / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    _expect_refusal(["--model", str(sd)], "does not support", out, capsys)
    (sd / "model_index.json").write_text(json.dumps(index))
    for f in (sd / "vae").iterdir():
        f.unlink()
    (sd / "vae").rmdir()
    _expect_refusal(["--model", str(sd)], "has no vae/ folder", out, capsys)


def test_quantized_unet_refuses_loader_options_it_cannot_honour(tmp_path: Path) -> None:
    source = save_unconditional_pipeline(tmp_path / "ddpm")
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(source), "--out", str(out), "--num-samples", "2", "--no-sensitivity",
                 "--no-precision-fallback", *FAST]) == 0
    with pytest.raises(ValueError, match="torch_dtype"):
        DiffusionPipeline.from_pretrained(str(out / "pipeline"), torch_dtype=torch.float16)
    with pytest.raises(TypeError, match="unexpected keyword 'revision_of_mine'"):
        QuantizedUNet.from_pretrained(out / "pipeline" / "unet", revision_of_mine=1)
    assert isinstance(QuantizedUNet.from_pretrained(out / "pipeline" / "unet", torch_dtype=torch.float32),
                      QuantizedUNet)


def test_bare_unet_and_scheduler_folder_becomes_a_pipeline(tmp_path: Path) -> None:
    source = save_unconditional_pipeline(tmp_path / "bare")
    (source / "model_index.json").unlink()  # what the bundled model looks like: unet/ + scheduler/ only
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(source), "--out", str(out), "--num-samples", "2", "--no-sensitivity",
                 "--no-precision-fallback", *FAST]) == 0
    index = json.loads((out / "pipeline" / "model_index.json").read_text())
    assert index["_class_name"] == "DDIMPipeline" and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    pipe = _load(out / "pipeline")
    assert isinstance(pipe.unet, QuantizedUNet)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)
