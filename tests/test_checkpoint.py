"""Tests for qdiff_ao.deploy.checkpoint: compressed save/load of lowered UNets, bit-identical outputs, validation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
from hypothesis import given
from hypothesis import strategies as st

import qdiff_ao
from qdiff_ao import CheckpointError, load, save
from qdiff_ao.deploy.checkpoint import files as _checkpoint_io
from qdiff_ao.deploy.checkpoint.files import read_checkpoint
from qdiff_ao.deploy.checkpoint.tensor_layout import TensorSlot, check_tensors, pack_int4, unpack_int4
from tests.checkpoint_helpers import SCHEMES, _inputs, _out, _unet
from tests.unet_factory import quantize_plain

warnings.filterwarnings("ignore", category=DeprecationWarning)

# --- format primitives ------------------------------------------------------------------------------------------


@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_pack_int4_round_trip(shape: list[int], seed: int) -> None:
    """unpack(pack(q)) == q for codes in [-8, 7]; ceil(n/2) bytes; the padding nibble is zero."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == ((codes.numel() + 1) // 2,)
    assert torch.equal(unpack_int4(packed, tuple(shape)), codes)
    if codes.numel() % 2:
        assert int(packed[-1]) >> 4 == 0


def test_pack_int4_rejects_wide_codes_and_checks_padding() -> None:
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor([8], dtype=torch.int8))
    slot = TensorSlot("codes", (2,), torch.uint8, (-8, 7), (3,))
    check_tensors({"w": pack_int4(torch.tensor([1, -2, 3], dtype=torch.int8))}, {"w": slot}, "f")
    with pytest.raises(CheckpointError, match="padding"):
        check_tensors({"w": torch.tensor([0x21, 0x53], dtype=torch.uint8)}, {"w": slot}, "f")


# --- round trips --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "scheme"),
    [("plain", "W8A8"), ("plain", "W4A8"), ("plain", "W4A32"), ("cond", "W8A8"), ("cond", "W4A8s16"),
     ("cond", "W4A32")],
)
def test_round_trip_is_bit_identical(saved: Any, arch: str, scheme: str, tmp_path: Path) -> None:
    """load(save(m)) computes exactly m at another batch size; re-saving the loaded model stores the same content."""
    model, path = saved(arch, scheme)
    loaded = load(path)
    for seed, batch in ((7, 3), (8, 1)):
        x = _inputs(arch, batch, seed)
        assert torch.equal(_out(loaded, x), _out(model, x))
    weight = read_checkpoint(path)[1]["conv_in.weight"]
    conv = loaded.graph_module.get_submodule("conv_in")
    numel = conv.weight.numel() if scheme.endswith("A32") else conv.weight().numel()
    if SCHEMES[scheme][0] == 4:
        assert weight.dtype == torch.uint8 and weight.numel() == (numel + 1) // 2
    else:
        assert weight.dtype == torch.int8 and weight.numel() == numel
    again = save(loaded, tmp_path / "again")
    for name in ("model.safetensors", "config.json"):  # byte-identical files: the writer is deterministic
        assert (again / name).read_bytes() == (path / name).read_bytes(), name


@pytest.mark.slow
def test_round_trip_default_config_lp_timestep_aware(tmp_path: Path) -> None:
    """Q-Diffusion's default W4A8 (Lp search, timestep-aware observers) reloads bit-identically."""
    unet = _unet("plain")
    cfg = qdiff_ao.QuantConfig()
    model = qdiff_ao.QuantizedUNet(quantize_plain(unet, cfg, [_inputs("plain", 2, 1)]), like=unet)
    loaded = load(save(model, tmp_path / "w4a8"))
    assert qdiff_ao.graph_info(loaded.graph_module).config == cfg
    x = _inputs("plain", 4, 3)
    assert torch.equal(_out(loaded, x), _out(model, x))


def test_config_json_contents(saved: Any) -> None:
    model, path = saved("plain", "W4A8")
    body = json.loads((path / "config.json").read_text())
    assert body["format_version"] == 1 and body["library"]["qdiff_ao"] == qdiff_ao.__version__
    assert body["unet_class"] == "UNet2DModel" and body["unet_config"]["block_out_channels"] == [8, 16]
    assert qdiff_ao.QuantConfig.from_dict(body["quant_config"]) == qdiff_ao.graph_info(model.graph_module).config
    assert body["trace"]["input_names"] == ["sample", "timestep"]
    assert body["trace"]["inputs"]["sample"] == {"ndim": 4, "dtype": "float32", "shape": [1, 8, 8]}
    assert body["split_shortcut"] and len(body["splits"]) == 4
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    _, tensors = read_checkpoint(path)
    assert body["num_tensors"] == len(tensors) and "_scale_0" in tensors and "_zero_point_0" in tensors
    assert "up_blocks.1.resnets.0.conv_shortcut.part1.weight" in tensors  # split shortcut halves


# --- pipelines ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("pipeline", "scheduler"), [(DDIMPipeline, DDIMScheduler), (DDPMPipeline, DDPMScheduler)])
def test_pipeline_images_identical(saved: Any, pipeline: Any, scheduler: Any) -> None:
    model, path = saved("plain", "W4A8")
    pipe = pipeline(unet=_unet("plain"), scheduler=scheduler(num_train_timesteps=50))
    pipe.set_progress_bar_config(disable=True)
    images = []
    for unet in (model, load(path)):
        pipe.unet = unet
        pipe.to("cpu")
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(3), num_inference_steps=4, output_type="np")
        images.append(out.images)
    assert images[0].shape == (2, 8, 8, 1) and (images[0] == images[1]).all()


def test_conditional_called_like_stable_diffusion(saved: Any) -> None:
    model, path = saved("cond", "W4A8s16")
    loaded = load(path).to("cpu").eval()
    x = _inputs("cond", 2, 5)
    hidden = x["encoder_hidden_states"]
    with torch.inference_mode():
        for t in (981, torch.tensor(981)):
            a = loaded(x["sample"], t, encoder_hidden_states=hidden, return_dict=False)[0]
            b = model(x["sample"], t, encoder_hidden_states=hidden).sample
            assert isinstance(loaded(x["sample"], t, hidden).sample, torch.Tensor)
            assert torch.equal(a, b)
    assert type(loaded(x["sample"], 1, hidden)).__name__ == "UNet2DConditionOutput"
    assert loaded.config.cross_attention_dim == 16 and loaded.dtype == torch.float32
    with pytest.raises(RuntimeError, match="cannot be trained"):
        loaded.train()


# --- writing ------------------------------------------------------------------------------------------------------


def test_save_refuses_to_replace_and_never_deletes_user_files(saved: Any, tmp_path: Path) -> None:
    model, _ = saved("plain", "W4A8")
    target = save(model, tmp_path / "ckpt")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(model, target)
    inode = (target / "model.safetensors").stat().st_ino
    assert save(model, target, overwrite=True) == target and (target / "model.safetensors").stat().st_ino != inode
    assert read_checkpoint(target)[0]["num_tensors"] > 0
    (target / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="never deletes"):
        save(model, target, overwrite=True)
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "data.bin").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="not a qdiff_ao checkpoint"):
        save(model, user_dir, overwrite=True)
    assert (user_dir / "data.bin").read_bytes() == b"x" and (target / "notes.txt").exists()
    (tmp_path / "empty").mkdir()
    save(model, tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directories left


def test_interrupted_save_leaves_nothing(saved: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = saved("plain", "W4A8")
    target = save(model, tmp_path / "old")
    before = (target / "model.safetensors").read_bytes()
    calls = {"n": 0}
    real = _checkpoint_io._write_file

    def failing(path: Path, data: bytes) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real(path, data)

    monkeypatch.setattr(_checkpoint_io, "_write_file", failing)
    with pytest.raises(KeyboardInterrupt):
        save(model, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        save(model, target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_save_rejects_what_load_could_not_rebuild(saved: Any, tmp_path: Path) -> None:
    model, _ = saved("plain", "W4A8")
    with pytest.raises(TypeError, match="QuantizedUNet or a converted"):
        save(_unet("plain"), tmp_path / "a")
    with pytest.raises(ValueError, match="unet_config"):
        save(model.graph_module, tmp_path / "b")
    unet = _unet("plain")
    cfg = qdiff_ao.QuantConfig(weight_bits=4, range_method="minmax")
    prepared = qdiff_ao.prepare(unet, cfg, _inputs("plain", 2, 1))
    with pytest.raises(ValueError, match="convert"):
        save(prepared, tmp_path / "c", unet_config=unet.config)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
