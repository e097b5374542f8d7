"""Speed of a timestep-grouped QuantizedUNet at a fixed timestep vs the single-grid one (#15 item 3: within 3%).

    python benchmarks/timestep_group_speed.py [--model digits] [--rounds 15] [--iters 10]

Quantizes the model with ``timestep_groups=4`` (no reconstruction: qparams do not change the kernels' speed) on
its zoo calibration settings, then times, interleaved in one process (every round: single-grid, then grouped),
frozen TorchScript both, at batch 1 and 8 and at a timestep of a group that kept its own grids:

* single grid: ``QuantizedUNet`` of the converted graph with the groups stripped from its graph info;
* grouped: the same converted graph with its groups (a bucketize and an index per call, then the group's graph).

Prints the median ratio single / grouped (1.00 = same speed; > 0.97 meets the goal) and the CPU flags.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.common import time_once  # noqa: E402
from benchmarks.machine import cpu_flags  # noqa: E402
from benchmarks.quality import MODELS, load_subject  # noqa: E402
from qdiff_ao.capture.graph_state import update_graph_info  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="digits")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, CPU flags: {cpu_flags()}")
    subject = load_subject(args.model)
    calib = qdiff_ao.collect_calibration_data(subject.unet, subject.scheduler, num_inference_steps=100,
                                              num_timesteps=20, samples_per_timestep=8, seed=0, progress=False,
                                              **subject.calib_kwargs)
    grouped = qdiff_ao.quantize(subject.unet, subject.scheduler, qdiff_ao.QuantConfig(), calib=calib,
                                reconstruct=False, timestep_groups=4, progress=False)
    report = grouped.quantization_info["timestep_groups"]
    kept = [g for g in report["groups"] if g["kept"]]
    if not kept:
        print("no group kept its own grids on this model: both variants are the same graph")
        return
    t = int(kept[0]["timesteps"][0])
    base = copy.deepcopy(grouped.graph_module)
    update_graph_info(base, timestep_groups=None)
    single = qdiff_ao.QuantizedUNet(base, like=subject.unet).eval().optimize_for_inference()
    grouped.optimize_for_inference()
    print(f"{len(kept)} of {len(report['groups'])} groups kept; timing at t = {t} "
          f"(group boundaries {grouped.timestep_group_boundaries})")
    c, s = subject.unet.config.in_channels, subject.unet.config.sample_size
    print("| batch | single grid (ms) | grouped (ms) | single / grouped |\n|---:|---:|---:|---:|")
    for batch in (1, 8):
        x = {"sample": torch.randn(batch, c, s, s), "timestep": torch.full((batch,), t)}
        if subject.calib_kwargs:
            x["encoder_hidden_states"] = subject.calib_kwargs["encoder_hidden_states"][:1].expand(batch, -1, -1)
        with torch.no_grad():
            assert not torch.equal(single(**x).sample, grouped(**x).sample), "the kept group should differ"
            ratios, ts, tg = [], [], []
            for _ in range(args.rounds):
                a = time_once(lambda x=x: single(**x), args.iters)
                b = time_once(lambda x=x: grouped(**x), args.iters)
                ratios.append(a / b)
                ts.append(a)
                tg.append(b)
        print(f"| {batch} | {1e3 * statistics.median(ts):.2f} | {1e3 * statistics.median(tg):.2f} | "
              f"{statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()
