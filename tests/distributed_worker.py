"""The body of one rank in tests/test_distributed.py (spawned by torch.multiprocessing; gloo over a file store).

Each rank quantizes the tiny attention UNet with the default recipe minus reconstruction (then with it),
collects the calibration set gathered and as shards, and writes what the test compares into ``out``:
rank 0 the checkpoint (``ckpt/``), every rank its tensors (``rank{r}.pt``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

WORLD = 2
COLLECT = dict(num_inference_steps=6, num_timesteps=3, samples_per_timestep=8, batch_size=2, seed=3, progress=False)


RECON = dict(weight_iters=30, act_iters=10, batch_size=8)


def quantize_tiny(reconstruct: bool = False, recon_seed: int = 0) -> Any:
    """The run both the 2-rank workers and the single process do (same arguments; one reconstruction run, as
    under torch.distributed, where the reconstruction choice is skipped)."""
    from diffusers import DDPMScheduler

    import qdiff_ao
    from tests.unet_factory import build_unet

    cfg = qdiff_ao.QuantConfig(reconstruction=qdiff_ao.ReconstructionConfig(seed=recon_seed, **RECON))
    return qdiff_ao.quantize(build_unet("attn"), DDPMScheduler(num_train_timesteps=1000), cfg,
                             reconstruct=reconstruct, choose_reconstruction=False, **COLLECT)


def eps_error(qunet: Any) -> tuple[float, torch.Tensor]:
    """(relative error of the quantized noise prediction vs FP on fixed inputs, the quantized output)."""
    from tests.unet_factory import build_unet, unet_inputs

    errors, outs = [], []
    for t in (900, 500, 50):
        inputs = unet_inputs("attn", 4, t=t)
        with torch.no_grad():
            ref = build_unet("attn")(**inputs).sample
            out = qunet(**inputs).sample
        errors.append(float((out - ref).norm() / ref.norm()))
        outs.append(out)
    return sum(errors) / len(errors), torch.cat(outs)


def collect_tiny(keep_shards: bool = False) -> Any:
    from diffusers import DDPMScheduler

    import qdiff_ao
    from tests.unet_factory import build_unet

    return qdiff_ao.collect_calibration_data(build_unet("attn"), DDPMScheduler(num_train_timesteps=1000),
                                             keep_shards=keep_shards, **COLLECT)


def run_rank(rank: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.pop("WORLD_SIZE", None)  # the group is set up here, not from a launcher's environment
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD)
    try:
        gathered = collect_tiny()
        shard = collect_tiny(keep_shards=True)
        qunet = quantize_tiny()
        qunet.save_pretrained(Path(out) / "ckpt")  # rank 0 writes; on rank 1 a no-op
        reconstructed = quantize_tiny(reconstruct=True)
        recon_error, recon_out = eps_error(reconstructed)
        ema_error = ""
        try:
            import qdiff_ao
            from tests.unet_factory import build_unet

            cfg = qdiff_ao.QuantConfig(act_observer="ema")
            prepared = qdiff_ao.prepare(build_unet("attn"), cfg, gathered.example_inputs(2))
            qdiff_ao.calibrate(prepared, gathered, progress=False)
        except TypeError as err:
            ema_error = str(err)
        torch.save({"gathered": dict(gathered._tensors()), "shard": dict(shard._tensors()),
                    "shard_meta": shard.metadata, "ema_error": ema_error,
                    "keep_float": qunet.quantization_info["config"]["keep_float"], "recon_error": recon_error,
                    "correction": qunet.quantization_info["bias_correction"],
                    "fallback": qunet.quantization_info["precision_fallback"],
                    "recon_out": recon_out, "recon_report": reconstructed.quantization_info["reconstruction"]},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_rank_that_may_die(rank: int, out: str) -> None:
    """Rank 1 dies right after joining the group; rank 0 records the error it gets (instead of hanging): in its
    first collective, or already while gloo connects the ranks when rank 1 is gone before the mesh is up (seen
    in CI: "Gloo connectFullMesh failed ... Connection closed by peer")."""
    import datetime

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=60))
        if rank == 1:
            os._exit(3)
        collect_tiny()
        outcome = "no error"
    except Exception as err:  # noqa: BLE001  the test reads what rank 0 saw
        if rank == 1:  # rank 1 exits with 3 also when its own init failed: the test expects exit codes [0, 3]
            os._exit(3)
        outcome = f"{type(err).__name__}: {err}"
    (Path(out) / "rank0_error.txt").write_text(outcome)
