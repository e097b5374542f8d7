"""The model card (``README.md``) of a quantized pipeline folder, generated from the run's report.

Hugging Face model-card convention: a YAML header (``base_model``, ``library_name``, ``pipeline_tag``, ``tags``)
then a Markdown body. Every figure in it is read from the report dict of ``qdiff-ao quantize`` (measured in that
run), none is typed in here. YAML scalars are written as JSON strings, which YAML reads unchanged.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["model_card", "card_tags"]

_PIPELINE_TAGS = {"text-to-image": "text-to-image", "unconditional": "unconditional-image-generation"}


def card_tags(report: dict[str, Any]) -> list[str]:
    """Tags: quantized, the engine names, the scheme (e.g. ``w4a8``), and the integer widths that run."""
    cfg = report["config"]
    tags = ["quantized", "qdiff-ao", "q-diffusion", "diffusers", report["scheme"].lower(), "int8"]
    if cfg["weight_bits"] == 4:
        tags.append("int4")
    return tags


def _yaml_header(report: dict[str, Any]) -> list[str]:
    lines = ["---", f"base_model: {json.dumps(report['base_model'])}", "library_name: diffusers",
             f"pipeline_tag: {_PIPELINE_TAGS[report['kind']]}", "tags:"]
    lines += [f"- {json.dumps(tag)}" for tag in card_tags(report)]
    return [*lines, "---"]


def _calibration_lines(report: dict[str, Any]) -> list[str]:
    cal = report["calibration"]
    lines = [f"- sampler: {cal['scheduler']}, {cal['steps']} steps; {cal['timesteps']} timesteps recorded "
             f"({cal['strategy']} over the whole trajectory), {cal['samples_per_timestep']} trajectories each"]
    if report["kind"] == "text-to-image":
        neg = f", negative prompt {json.dumps(cal['negative_prompt'])}" if cal.get("negative_prompt") else ""
        lines.append(f"- {len(cal['prompts'])} prompts (from {cal['prompts_source']}), classifier-free guidance "
                     f"{cal['guidance_scale']}{neg}; both halves of the guidance batch are calibration rows")
    return lines


def _figures_lines(report: dict[str, Any]) -> list[str]:
    speed = report["speed_ratio_vs_fp32"]
    lines = ["| measure | FP32 | quantized |", "|---|---:|---:|",
             f"| UNet size (bytes) | {report['fp32_safetensors_bytes']:,} | {report['checkpoint_bytes']:,} "
             f"({report['size_ratio']:.3f}x) |",
             f"| UNet speed vs FP32 eager on this CPU, batch 1 / {speed['batch']} | 1.00x | "
             f"{speed['batch_1']:.2f}x / {speed['batch_n']:.2f}x |",
             f"| mean relative noise-prediction error along the FP DDIM trajectory | 0 | "
             f"{report['noise_prediction_error_mean']:.4f} |"]
    if "fd" in report:
        lines.append(f"| digits FD ({report['num_samples']} samples) | {report['fd']['fp']:.3f} | "
                     f"{report['fd']['quantized']:.3f} |")
    return lines


def model_card(report: dict[str, Any]) -> str:
    """The card text for the report of one ``qdiff-ao quantize`` run (see the module docstring)."""
    cfg = report["config"]
    acts = f"{cfg['act_bits']}-bit activations" if cfg["act_bits"] else "float activations"
    fallback = report.get("precision_fallback") or {}
    kept = ", ".join(f"`{name}`" for name in fallback.get("layers", ())) or "none"
    body = [
        "", f"# {report['scheme']} Q-Diffusion quantization of `{report['base_model']}`", "",
        f"A `{report['pipeline_class']}` whose UNet is quantized after training with "
        "qdiff_ao (Q-Diffusion: timestep-aware calibration, split shortcut quantization, "
        f"block reconstruction) to {cfg['weight_bits']}-bit weights and {acts}, lowered to INT8 kernels "
        "(fbgemm/x86) and stored as a compressed safetensors checkpoint. Every other component is the base "
        "model's, unchanged.", "",
        "## Load", "", "```python", "from diffusers import DiffusionPipeline",
        "", "pipe = DiffusionPipeline.from_pretrained(\"path/to/this/folder\")  # needs `pip install qdiff-ao`",
        "```", "",
        "`pipe.unet` is a `qdiff_ao.QuantizedUNet` (CPU, float32 inputs and outputs); diffusers logs that it "
        "expected its own UNet class, which is harmless.", "",
        "## Quantization", "", f"- scheme: {report['scheme']} (weights per output channel, activations per tensor)",
        f"- layers kept in float by the measured precision fallback: {kept}",
        *_calibration_lines(report), "",
        "## Measured in this run", "", *_figures_lines(report), "",
        f"Quantization took {report['quantize_seconds']} s on the machine that ran it. Speed ratios are medians "
        "of interleaved rounds on that CPU; they vary with the CPU.", "",
    ]
    return "\n".join(_yaml_header(report) + body)
