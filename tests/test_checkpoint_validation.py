"""Tests for qdiff_ao.deploy.checkpoint validation: foreign directories, damaged files, tensors that do not fit."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qdiff_ao import CheckpointError, load
from tests.checkpoint_helpers import _copy, _inputs, _out, _resign, _unet

# --- validation ---------------------------------------------------------------------------------------------------


def test_rejects_directories_that_are_not_checkpoints(saved: Any, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load(tmp_path)
    _unet("plain").save_pretrained(tmp_path / "diffusers")
    with pytest.raises(CheckpointError, match="diffusers model folder"):
        load(tmp_path / "diffusers")
    path = _copy(saved("plain", "W4A8")[1], tmp_path)
    body = json.loads((path / "config.json").read_text())
    body["format_version"] = 99
    (path / "config.json").write_text(json.dumps(body))
    with pytest.raises(CheckpointError, match="format_version 99 is not supported"):
        load(path)


@pytest.mark.parametrize("damage", ["truncate", "header", "data", "config_value", "missing_file"])
def test_detects_file_damage(saved: Any, tmp_path: Path, damage: str) -> None:
    path = _copy(saved("plain", "W4A8")[1], tmp_path)
    tensors = path / "model.safetensors"
    data = bytearray(tensors.read_bytes())
    match = "SHA-256"
    if damage == "truncate":
        tensors.write_bytes(data[: len(data) // 2])
        match = "truncated"
    elif damage in ("header", "data"):
        data[20 if damage == "header" else len(data) - 3] ^= 0x10
        tensors.write_bytes(bytes(data))
    elif damage == "config_value":
        body = json.loads((path / "config.json").read_text())
        body["quant_config"]["act_bits"] = 6
        (path / "config.json").write_text(json.dumps(body))
        match = "config_sha256"
    else:
        tensors.unlink()
        match = "model.safetensors is missing"
    with pytest.raises(CheckpointError, match=match):
        load(path)


def _set(name: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, Any], dict[str, Any]], None]:
    def edit(body: dict[str, Any], tensors: dict[str, Any]) -> None:
        tensors[name] = value(tensors[name])

    return edit


def _drop(body: dict[str, Any], tensors: dict[str, Any]) -> None:
    del tensors["conv_out.bias"]


def _add(body: dict[str, Any], tensors: dict[str, Any]) -> None:
    tensors["conv_out.extra"] = torch.zeros(2)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (_set("conv_in.weight_scale", lambda t: t.float()), r"'conv_in.weight_scale' is torch.float32"),
        (_set("conv_out.bias", lambda t: t.repeat(2)), r"'conv_out.bias' is torch.float32 of shape \(2,\)"),
        (_drop, r"missing \['conv_out.bias'\]"),
        (_add, r"unexpected \['conv_out.extra'\]"),
        (_set("_scale_0", lambda t: torch.full_like(t, float("nan"))), r"'_scale_0' holds scales that are not finite"),
        (_set("_scale_1", lambda t: torch.full_like(t, float("inf"))), "not finite and > 0"),
        (_set("conv_in.weight_scale", lambda t: t * 0), "'conv_in.weight_scale' holds scales"),
        (_set("conv_in.scale", lambda t: -t), "'conv_in.scale' holds scales"),
        (_set("_zero_point_0", lambda t: t + 300), r"'_zero_point_0' has zero points outside \[0, 255\]"),
        (_set("conv_in.weight_zero_point", lambda t: t - 200), r"zero points outside \[-128, 127\]"),
    ],
)
def test_rejects_tensors_that_do_not_fit_the_config(saved: Any, tmp_path: Path, edit: Any, match: str) -> None:
    path = _resign(saved("plain", "W4A8")[1], tmp_path / "bad", edit=edit)
    with pytest.raises(CheckpointError, match=match) as info:
        load(path)
    assert "model.safetensors" in str(info.value)


def test_rejects_codes_outside_the_weight_range(saved: Any, tmp_path: Path) -> None:
    """W8A8 under reduce_range="auto" keeps weights in [-64, 63]; a code of 100 is refused."""
    edit = _set("conv_in.weight", lambda t: t.clone().fill_(100))
    with pytest.raises(CheckpointError, match=r"'conv_in.weight' has weight codes outside \[-64, 63\]"):
        load(_resign(saved("plain", "W8A8")[1], tmp_path / "bad", edit=edit))


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("unet_config", {"block_out_channels": [8, 24]},
         r"'down_blocks.1.resnets.0.conv1.weight' is torch.uint8 of shape \(576,\), but the config needs .* \(864,\)"),
        ("unet_config", {"norm_num_groups": 8}, "does not describe the saved model"),
        ("unet_class", "UNet2DConditionModel", "cannot rebuild"),
        ("unet_class", "os.system", "not a diffusers model class"),
        ("quant_config", {"weight_bits": 9}, "invalid quant_config"),
    ],
)
def test_rejects_a_config_for_another_model(saved: Any, tmp_path: Path, key: str, value: Any, match: str) -> None:
    def edit(body: dict[str, Any], tensors: dict[str, Any]) -> None:
        body[key] = {**body[key], **value} if isinstance(value, dict) else value

    with pytest.raises(CheckpointError, match=match):
        load(_resign(saved("plain", "W4A8")[1], tmp_path / "other", edit=edit))


@settings(max_examples=25, deadline=None)
@given(file=st.sampled_from(["config.json", "model.safetensors"]), where=st.floats(0, 1, exclude_max=True),
       mask=st.integers(1, 255), truncate=st.booleans())
def test_random_corruption_is_detected_or_harmless(saved: Any, file: str, where: float, mask: int,
                                                   truncate: bool) -> None:
    """Any damaged byte gives a CheckpointError, or a model computing exactly the original (e.g. JSON whitespace)."""
    model, path = saved("plain", "W4A8")
    with tempfile.TemporaryDirectory() as tmp:
        copy = _copy(path, Path(tmp))
        target = copy / file
        data = bytearray(target.read_bytes())
        pos = int(where * len(data))
        if truncate:
            del data[pos:]
        else:
            data[pos] ^= mask
        target.write_bytes(bytes(data))
        try:
            loaded = load(copy)
        except CheckpointError:
            return
        x = _inputs("plain", 2, 11)
        assert torch.equal(_out(loaded, x), _out(model, x))
