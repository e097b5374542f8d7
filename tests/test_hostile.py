"""Hostile but realistic input (issue 16): each case ends in a clear error of the documented type, never a silent
wrong result. Cases fixed so far: non-finite inputs, out-of-range / boolean timesteps, conditioning a graph does
not take, inputs on another device, one calibration sample per timestep, non-finite tensors in a re-signed
checkpoint, a damaged calibration file, and byte-identical checkpoints across processes with different hash
seeds."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

import qdiff_ao
from tests.checkpoint_helpers import _inputs, _resign

NON_FINITE = (float("nan"), float("inf"), float("-inf"))


@pytest.fixture(scope="module")
def plain_unet(saved: Any) -> Any:
    """A wrapper of its own around the shared session model's graph (tests here must not change that model)."""
    model = saved("plain", "W8A8")[0]
    return qdiff_ao.QuantizedUNet(model.graph_module, config=model.config)


@pytest.fixture(scope="module")
def frozen_unet(saved: Any) -> Any:
    model = saved("plain", "W8A8")[0]
    return qdiff_ao.QuantizedUNet(model.graph_module, config=model.config).optimize_for_inference()


@pytest.mark.parametrize("frozen", [False, True])
@given(value=st.sampled_from(NON_FINITE), where=st.integers(0, 63))
@settings(max_examples=6, deadline=None)
def test_non_finite_sample_is_refused(plain_unet: Any, frozen_unet: Any, frozen: bool, value: float,
                                      where: int) -> None:
    """A NaN/Inf anywhere in the sample raises ValueError (GraphModule and frozen TorchScript execution)."""
    model = frozen_unet if frozen else plain_unet
    x = _inputs("plain", 1, seed=3)
    x["sample"].view(-1)[where] = value
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(**x)


def test_check_finite_opt_out(plain_unet: Any) -> None:
    model = qdiff_ao.QuantizedUNet(plain_unet.graph_module, config=plain_unet.config)
    x = _inputs("plain", 1, seed=3)
    x["sample"][0, 0, 0, 0] = float("nan")
    model.check_finite = False
    with torch.no_grad():
        assert model(**x).sample.shape == (1, 1, 8, 8)  # the documented opt-out: no check, no error


@pytest.mark.parametrize("timestep,error,match", [
    (float("inf"), ValueError, "finite"), (float("-inf"), ValueError, "finite"), (float("nan"), ValueError, "finite"),
    (1e30, ValueError, "integer range"), (True, TypeError, "integer or real"),
    (torch.tensor([1.0, float("inf")]), ValueError, "finite"),
])
def test_bad_timesteps_are_refused(plain_unet: Any, timestep: Any, error: type[Exception], match: str) -> None:
    x = _inputs("plain", 2, seed=4)
    with pytest.raises(error, match=match):
        plain_unet(x["sample"], timestep)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("where", ["sample", "timestep"])
def test_inputs_on_another_device_are_refused(plain_unet: Any, frozen_unet: Any, frozen: bool, where: str) -> None:
    """A pipeline left on a GPU feeds CUDA tensors; the CPU kernels would fail deep inside a quantized op. The
    "meta" device stands in for CUDA here (same check: device type other than cpu); tests/test_cuda_pipelines.py
    runs the real case."""
    model = frozen_unet if frozen else plain_unet
    x = _inputs("plain", 2, seed=4)
    x[where] = x[where].to("meta")
    with pytest.raises(ValueError, match=f"INT8 kernels on the CPU, but {where} is on meta"):
        model(**x)


def test_conditioning_the_graph_does_not_take_is_refused(plain_unet: Any) -> None:
    x = _inputs("plain", 2, seed=5)
    with pytest.raises(TypeError, match="traced without encoder_hidden_states"):
        plain_unet(**x, encoder_hidden_states=torch.randn(2, 5, 16))
    with pytest.raises(TypeError, match="traced without class_labels"):
        plain_unet(**x, class_labels=torch.tensor([1, 2]))


def test_one_sample_per_timestep_quantizes() -> None:
    from tests.checkpoint_helpers import _unet

    unet = _unet("plain")
    qunet = qdiff_ao.quantize(unet, DDIMScheduler(), qdiff_ao.QuantConfig(weight_bits=8, act_bits=8),
                              num_inference_steps=4, num_timesteps=2, samples_per_timestep=1, reconstruct=False,
                              progress=False)
    assert qunet.quantization_info["calibration_samples"] == 2


@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_float_tensor_in_a_resigned_checkpoint_is_refused(saved: Any, tmp_path: Path,
                                                                     value: float) -> None:
    """An attacker who recomputes the hashes still cannot plant NaN/Inf in a bias or a norm weight."""
    _, path = saved("plain", "W8A8")

    def poison(body: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        name = next(k for k in sorted(tensors) if k.endswith("norm.weight") or k.endswith("norm1.weight"))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value

    bad = _resign(path, tmp_path / "bad", edit=poison)
    with pytest.raises(qdiff_ao.CheckpointError, match="non-finite"):
        qdiff_ao.load(bad)


def test_damaged_calibration_file_is_refused(tmp_path: Path) -> None:
    calib = qdiff_ao.CalibrationSet(torch.randn(4, 1, 8, 8), torch.tensor([900, 900, 100, 100]))
    path = tmp_path / "calib.safetensors"
    calib.save(path)
    assert torch.equal(qdiff_ao.CalibrationSet.load(path).sample, calib.sample)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one flipped bit in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        qdiff_ao.CalibrationSet.load(path)


_QUANTIZE_AND_SAVE = """
import sys, torch, qdiff_ao
from diffusers import DDIMScheduler
sys.path.insert(0, {root!r})
from tests.checkpoint_helpers import _unet
torch.manual_seed(0)
qunet = qdiff_ao.quantize(_unet("plain"), DDIMScheduler(), qdiff_ao.QuantConfig(weight_bits=4, act_bits=8),
                          num_inference_steps=4, num_timesteps=2, samples_per_timestep=2, reconstruct=False,
                          progress=False)
qunet.save_pretrained({out!r})
"""


def test_two_processes_with_different_hash_seeds_write_identical_checkpoints(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parents[1])
    digests = []
    for seed in ("1", "2"):
        out = tmp_path / f"ckpt-{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        proc = subprocess.run([sys.executable, "-c", _QUANTIZE_AND_SAVE.format(root=root, out=str(out))],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.append({name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                        for name in ("model.safetensors", "config.json")})
    assert digests[0] == digests[1]


@pytest.mark.parametrize("edit", [
    {"block_out_channels": [768, 1536]},
    {"layers_per_block": 10**6},
    {"layers_per_block": 50},
])
def test_config_describing_a_huge_model_is_refused_before_allocating(saved: Any, tmp_path: Path,
                                                                     edit: dict[str, Any]) -> None:
    """A re-signed < 100 KB checkpoint whose config names a large model fails fast, without allocating it."""
    import resource
    import time
    import tracemalloc

    _, path = saved("plain", "W4A8")

    def enlarge(body: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        body["unet_config"] = {**body["unet_config"], **edit}

    bad = _resign(path, tmp_path / "bomb", edit=enlarge)
    assert sum(f.stat().st_size for f in bad.iterdir()) < 100_000
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(qdiff_ao.CheckpointError, match="the config was edited or belongs to another model"):
            qdiff_ao.load(bad)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0, elapsed
    assert peak < 200 * 2**20, peak  # Python allocations while refusing
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown < 200 * 2**10, grown  # the process's peak resident memory grew by < 200 MB


def test_deeply_nested_config_is_a_checkpoint_error(saved: Any, tmp_path: Path) -> None:
    _, path = saved("plain", "W8A8")
    bad = Path(shutil.copytree(path, tmp_path / "nested"))
    (bad / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(qdiff_ao.CheckpointError, match="nested too deeply|not valid JSON"):
        qdiff_ao.load(bad)


_KILLED_SAVE = """
import os, sys
sys.path.insert(0, {root!r})
from qdiff_ao.deploy.checkpoint import files
from qdiff_ao.deploy.checkpoint.files import read_checkpoint, write_checkpoint
body, tensors = read_checkpoint({src!r})
body = {{k: v for k, v in body.items() if k not in ("tensors_bytes", "tensors_sha256")}}
renames = []
real_rename = os.rename

def rename_then_die(a, b):
    real_rename(a, b)
    renames.append(b)
    if {kill_after} == len(renames):
        os._exit(9)  # SIGKILL-like: no cleanup code runs

files.os.rename = rename_then_die
write_checkpoint({dst!r}, body, tensors, overwrite=True)
"""


@pytest.mark.parametrize("kill_after", [1, 2])
def test_save_killed_between_the_renames_is_recovered(saved: Any, tmp_path: Path, kill_after: int) -> None:
    """kill_after=1: old moved away, new not in place: the next load completes the swap; kill_after=2: both renames
    done, the old copy not yet deleted: the next load removes it. No hidden folder is left either way."""
    model, src = saved("plain", "W8A8")
    dst = Path(shutil.copytree(src, tmp_path / "ckpt"))
    script = _KILLED_SAVE.format(root=str(Path(__file__).resolve().parents[1]), src=str(src), dst=str(dst),
                                 kill_after=kill_after)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 9, proc.stderr[-2000:]
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt."))
    assert leftovers, "the kill should have left the swap unfinished"
    assert dst.exists() == (kill_after == 2)
    loaded = qdiff_ao.load(dst)
    x = _inputs("plain", 2, seed=11)
    with torch.no_grad():
        assert torch.equal(loaded(**x).sample, model(**x).sample)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("timestep,sample,error", [
    (torch.tensor([True, False]), torch.randn(2, 1, 8, 8), TypeError),
    (torch.tensor([900, 100]), torch.tensor([[[[float("nan")]]], [[[0.0]]]]), ValueError),
    (torch.tensor([900, 100]), torch.ones(2, 1, 8, 8, dtype=torch.int64), ValueError),
])
def test_calibration_set_refuses_meaningless_data(timestep: torch.Tensor, sample: torch.Tensor,
                                                  error: type[Exception]) -> None:
    with pytest.raises(error, match="CalibrationSet"):
        qdiff_ao.CalibrationSet(sample, timestep)


_INT_FIELDS = ("layers_per_block", "norm_num_groups", "sample_size", "in_channels", "out_channels",
               "attention_head_dim", "block_out_channels")


@given(field=st.sampled_from(_INT_FIELDS), value=st.integers(-3, 10**7))
@settings(max_examples=12, deadline=None)
def test_random_config_mutations_are_refused_or_harmless(saved: Any, tmp_path_factory: pytest.TempPathFactory,
                                                         field: str, value: int) -> None:
    """A re-signed config with one integer field changed: CheckpointError, or (an equivalent value) the very same
    model; never another error type, a hang or a silently different model."""
    model, path = saved("plain", "W4A8")

    def mutate(body: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
        cfg = dict(body["unet_config"])
        cfg[field] = [value, value] if field == "block_out_channels" else value
        body["unet_config"] = cfg

    bad = _resign(path, tmp_path_factory.mktemp("mutated") / "ckpt", edit=mutate)
    try:
        loaded = qdiff_ao.load(bad)
    except qdiff_ao.CheckpointError:
        return
    x = _inputs("plain", 2, seed=12)
    with torch.no_grad():
        assert torch.equal(loaded(**x).sample, model(**x).sample)
