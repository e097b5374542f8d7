"""Wall time and peak memory of ``qdiff_ao.quantize`` in 1 process vs 2 torchrun processes (gloo), per phase.

    python benchmarks/distributed_scaling.py [--samples-per-timestep 16] [--recon-iters 200] [--out DIR]

The model is google/ddpm-cifar10-32's configuration (35.7M parameters, random weights: time and memory do not
depend on the weights). Runs, one after the other: 1 process with 1 thread, 1 process with 2 threads, and
``torchrun --nproc_per_node=2`` with 1 thread per process (the machine's two cores either way). Each run
quantizes with the default recipe (W4A8, fallback, reconstruction with ``--recon-iters`` AdaRound iterations and
a quarter of that for step sizes, output correction) on a DDIM trajectory of ``--steps`` steps and prints the
per-phase timings of ``quantization_info["timings"]`` and every rank's peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``). Prints the CPU flags it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import cpu_flags  # noqa: E402

PHASES = ("collect_s", "calibrate_s", "precision_fallback_s", "reconstruct_s", "bias_correction_s", "convert_s")


def worker(args: argparse.Namespace) -> None:
    """One rank (or the single process): quantize and write this rank's timings and peak RSS as JSON."""
    import torch
    from diffusers import DDIMScheduler

    import qdiff_ao
    from benchmarks.common import cifar10_ddpm_unet
    from qdiff_ao.calibration.distributed import init_from_environment, rank_and_world

    torch.set_num_threads(args.threads)
    init_from_environment()
    rank, world = rank_and_world()
    unet = cifar10_ddpm_unet()
    rcfg = qdiff_ao.ReconstructionConfig(weight_iters=args.recon_iters, act_iters=max(1, args.recon_iters // 4))
    start = time.perf_counter()
    qunet = qdiff_ao.quantize(unet, DDIMScheduler(num_train_timesteps=1000), qdiff_ao.QuantConfig(reconstruction=rcfg),
                              num_inference_steps=args.steps, num_timesteps=args.timesteps,
                              samples_per_timestep=args.samples_per_timestep, batch_size=8, progress=False)
    wall = time.perf_counter() - start
    info = qunet.quantization_info
    record = {"rank": rank, "world": world, "threads": args.threads, "wall_s": wall,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "timings": info["timings"], "recon_rows": info["reconstruction"].get("num_samples"),
              "cache_bytes": info["reconstruction"].get("cache_bytes")}
    Path(args.worker_out, f"rank{rank}.json").write_text(json.dumps(record))


def run(label: str, cmd: list[str], threads: int, out: Path) -> dict:
    out.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd + ["--worker-out", str(out)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{label} failed:\n{done.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    return {"label": label, "total_s": time.perf_counter() - start, "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps of the calibration trajectory")
    parser.add_argument("--timesteps", type=int, default=10, help="calibration timesteps")
    parser.add_argument("--samples-per-timestep", type=int, default=16)
    parser.add_argument("--recon-iters", type=int, default=200)
    parser.add_argument("--out", default=None, help="folder for the JSON results (default: a temporary one)")
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker_out:
        worker(args)
        return
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, flags: {cpu_flags()}")
    base = [sys.executable, str(Path(__file__).resolve()), "--steps", str(args.steps), "--timesteps",
            str(args.timesteps), "--samples-per-timestep", str(args.samples_per_timestep), "--recon-iters",
            str(args.recon_iters)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                str(Path(__file__).resolve())] + base[2:]
    root = Path(args.out or tempfile.mkdtemp(prefix="qdiff_scaling_"))
    results = [run("1 process x 1 thread", base + ["--threads", "1"], 1, root / "p1t1"),
               run("1 process x 2 threads", base + ["--threads", "2"], 2, root / "p1t2"),
               run("2 processes x 1 thread (torchrun, gloo)", torchrun + ["--threads", "1"], 1, root / "p2t1")]
    (root / "scaling.json").write_text(json.dumps(results, indent=2))
    print(f"\nCIFAR-10 DDPM config, W4A8 defaults, {args.timesteps} timesteps x {args.samples_per_timestep} samples, "
          f"{args.recon_iters} AdaRound iterations per block\n")
    print("| run | wall (s) | " + " | ".join(p[:-2] for p in PHASES) + " | peak RSS per rank (MiB) | rows cached |")
    print("|---|---:|" + "---:|" * len(PHASES) + "---:|---:|")
    for r in results:
        first = r["ranks"][0]
        phases = " | ".join(f"{first['timings'].get(p, 0.0):.1f}" for p in PHASES)
        rss = " / ".join(f"{x['peak_rss_mib']:.0f}" for x in r["ranks"])
        rows = " / ".join(str(x["recon_rows"]) for x in r["ranks"])
        print(f"| {r['label']} | {max(x['wall_s'] for x in r['ranks']):.1f} | {phases} | {rss} | {rows} |")
    print(f"\nresults: {root / 'scaling.json'}")


if __name__ == "__main__":
    main()
