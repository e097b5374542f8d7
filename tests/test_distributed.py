"""Calibration on torch.distributed equals one process: sharded sampling, exact observer merging, rank-0 writes.

Two gloo ranks are spawned by the test (tests/distributed_worker.py); the single-process reference runs here.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from qdiff_ao.observers.histogram import rebin_histogram, update_histogram
from tests import distributed_worker


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=60),
       st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32), min_size=1, max_size=60),
       st.sampled_from([2, 8, 64]))
def test_histograms_merged_from_two_ranks_equal_one_histogram_of_all_data(a: list[float], b: list[float],
                                                                          bins: int) -> None:
    def histogram(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        return update_histogram(torch.zeros(1, bins, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                torch.tensor([values]))

    (ha, ra), (hb, rb), (hall, rall) = histogram(a), histogram(b), histogram(a + b)
    bound = torch.maximum(ra, rb)
    merged = rebin_histogram(ha, ra, bound) + rebin_histogram(hb, rb, bound)
    assert torch.equal(bound, rall) and torch.equal(merged, hall)


def test_the_group_is_gloo_on_gpu_machines_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows and per-timestep sums are CPU tensors, which NCCL cannot carry: torchrun's environment gives a
    gloo group whether or not CUDA is present."""
    import torch.distributed as dist

    from qdiff_ao.calibration import distributed

    chosen: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: chosen.append(backend))
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.init_from_environment()
    assert chosen == ["gloo"]


def test_rebin_refuses_a_smaller_or_non_power_of_two_grid() -> None:
    hist, bound = update_histogram(torch.zeros(1, 8, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                   torch.tensor([[0.3, -0.7]]))
    for new in (bound / 2, bound * 3):
        with pytest.raises(ValueError, match="power of two"):
            rebin_histogram(hist, bound, new)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The ranks run one thread each; float kernels round alike only at the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp(f"dist{attempt}")  # a fresh file store per attempt
        try:
            torch.multiprocessing.start_processes(distributed_worker.run_rank, args=(str(out),),
                                                  nprocs=distributed_worker.WORLD, start_method="spawn")
            return out
        except torch.multiprocessing.ProcessExitedException as err:
            # A rank killed by a signal, not by a failed check: seen once in CI (2026-12-06), rank 1 SIGABRT in
            # gloo's native code ("terminate called without an active exception"), the file then passing 9/9.
            # One retry; a second death, or any Python error in a rank, fails the tests.
            if attempt == 2 or err.signal_name is None:
                raise
            warnings.warn(f"distributed ranks died by a signal ({err}); retrying once", stacklevel=1)
    raise AssertionError("unreachable")


def test_two_ranks_collect_the_single_process_set_row_for_row(two_ranks: Path, one_thread: None) -> None:
    single = distributed_worker.collect_tiny()
    ranks = [torch.load(two_ranks / f"rank{r}.pt") for r in range(distributed_worker.WORLD)]
    for rank in ranks:
        for name, value in single._tensors().items():
            assert torch.equal(rank["gathered"][name], value), name
    # keep_shards: each rank keeps the rows of its own chunks, which together are the whole set
    shard_rows = sum(len(r["shard"]["sample"]) for r in ranks)
    assert shard_rows == len(single) and [r["shard_meta"]["shard"] for r in ranks] == ["0/2", "1/2"]
    samples = torch.cat([r["shard"]["sample"] for r in ranks])
    assert torch.equal(samples.sort(dim=0).values, single.sample.sort(dim=0).values)


def test_two_ranks_write_the_single_process_checkpoint(two_ranks: Path, tmp_path: Path, one_thread: None) -> None:
    single = distributed_worker.quantize_tiny()
    single.save_pretrained(tmp_path / "ckpt")
    dist_tensors = load_file(two_ranks / "ckpt" / "model.safetensors")
    one_tensors = load_file(tmp_path / "ckpt" / "model.safetensors")
    corrected = False
    assert dist_tensors.keys() == one_tensors.keys()
    for name, value in one_tensors.items():
        other = dist_tensors[name]
        if "output_correction" in name:  # sums over the ranks' timesteps: float64, summed in another order
            assert torch.allclose(other, value, rtol=1e-5, atol=1e-7), name
            corrected = True
        elif value.is_floating_point():
            assert torch.equal(other, value), name  # exact merging: bit-identical qparams
        else:
            assert torch.equal(other, value), name  # integer codes: identical
    assert corrected, "the output correction is part of the compared checkpoint"
    ranks = [torch.load(two_ranks / f"rank{r}.pt") for r in range(distributed_worker.WORLD)]
    assert ranks[0]["keep_float"] == ranks[1]["keep_float"] == single.quantization_info["config"]["keep_float"]
    # measurements dealt over the ranks (timesteps round-robin) reach the one-process decisions
    assert ranks[0]["correction"] == ranks[1]["correction"]
    assert [g["kind"] for g in ranks[0]["correction"]["groups"]] == [
        g["kind"] for g in single.quantization_info["bias_correction"]["groups"]]  # none / offset / gain
    assert ranks[0]["fallback"] == ranks[1]["fallback"]
    config = json.loads((two_ranks / "ckpt" / "config.json").read_text())
    assert config == json.loads((tmp_path / "ckpt" / "config.json").read_text())


def test_data_parallel_reconstruction_keeps_ranks_identical_and_matches_one_process(two_ranks: Path,
                                                                                   one_thread: None) -> None:
    ranks = [torch.load(two_ranks / f"rank{r}.pt") for r in range(distributed_worker.WORLD)]
    assert torch.equal(ranks[0]["recon_out"], ranks[1]["recon_out"]), "the ranks ended with different models"
    assert ranks[0]["recon_report"]["num_samples"] == ranks[1]["recon_report"]["num_samples"] == 24  # 12 per rank
    # one process, two seeds of the mini-batch draws: the 2-rank result lies within their spread (+-25%)
    singles = [distributed_worker.eps_error(distributed_worker.quantize_tiny(True, seed))[0] for seed in (0, 1)]
    no_recon = distributed_worker.eps_error(distributed_worker.quantize_tiny(False))[0]
    assert 0.75 * min(singles) <= ranks[0]["recon_error"] <= 1.25 * max(singles), (ranks[0]["recon_error"], singles)
    print(f"eps error: 2 ranks {ranks[0]['recon_error']:.4f}, 1 process {singles}, no reconstruction {no_recon:.4f}")


def test_order_dependent_observers_are_refused_across_ranks(two_ranks: Path) -> None:
    for r in range(distributed_worker.WORLD):
        assert "EMAMinMaxObserver" in torch.load(two_ranks / f"rank{r}.pt")["ema_error"]


def test_a_rank_that_dies_makes_the_others_fail_instead_of_hang(tmp_path: Path) -> None:
    context = torch.multiprocessing.start_processes(distributed_worker.run_rank_that_may_die, args=(str(tmp_path),),
                                                    nprocs=distributed_worker.WORLD, start_method="spawn", join=False)
    for process in context.processes:
        process.join(timeout=120)
    assert [p.exitcode for p in context.processes] == [0, 3]
    seen = (tmp_path / "rank0_error.txt").read_text()
    assert seen != "no error" and ("Error" in seen), seen


def test_torchrun_cli_writes_one_output(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.pipeline_factory import save_unconditional_pipeline

    model = save_unconditional_pipeline(tmp_path / "ddpm")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "qdiff_ao.app.cli", "quantize", "--model", str(model), "--out", str(out), "--calibration-steps", "6",
           "--calibration-timesteps", "3", "--samples-per-timestep", "4", "--recon-iters", "0",
           "--sampling-steps", "3", "--num-samples", "2", "--no-sensitivity", "--quiet", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QDIFF_AO_DIST_TIMEOUT_S": "120"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddpm", "out"], "a rank wrote something else"
    assert (out / "pipeline" / "unet" / "model.safetensors").is_file()
