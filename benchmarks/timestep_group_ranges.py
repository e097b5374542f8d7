"""How much would per-timestep-group activation ranges lower the eps error? A simulation-only probe (#15 item 3).

    python benchmarks/timestep_group_ranges.py --model shapes16-cond [--weight-bits 8] [--groups 1 2 4 5 10]

Quantizes the model with ``qdiff_ao.quantize`` defaults (calibration: 100-step DDIM, 20 timesteps,
``--samples`` rows each) and, before conversion, measures in the fake-quant simulation the relative eps error
``e(t) = |f_q - f_fp| / |f_fp|`` per calibration timestep (guided output for classifier-free guidance, as the
sampler uses it) when every activation quantizer gets its grid per group of timesteps instead of one grid:

    [L, U] = the final grid of the quantizer (after reconstruction's step-size learning), [m, M] its float input's
    range over all calibration rows, [m_g, M_g] over the rows of group g (timesteps cut into G contiguous groups
    of equal counts, as the output correction cuts them);
    group grid: [L_g, U_g] = m_g + ([L, U] - m) (M_g - m_g) / (M - m)    (L_g = 0 for a non-negative input),
    s_g = (U_g - L_g) / (quant_max - quant_min),   z_g = clamp(round(quant_min - L_g / s_g)).

That is the clipping the recipe chose, carried over to each group's range; nothing is re-optimised per group, so
the figures are a lower bound on what per-group qparams give. Weights are untouched (they stay shared).
Nothing here is lowered and nothing is chosen on held-back rows: the probe sized the real build,
``qdiff_ao.passes.choose_timestep_groups`` (``qdiff_ao.quantize(..., timestep_groups=G)``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from benchmarks.machine import cpu_flags  # noqa: E402
from benchmarks.quality import MODELS, load_subject  # noqa: E402
from qdiff_ao.calibration.sampler_view import ErrorProbe  # noqa: E402
from qdiff_ao.calibration.sensitivity import _output_tensor  # noqa: E402
from qdiff_ao.quantizers.adaround import LearnedStepQuant  # noqa: E402
from qdiff_ao.quantizers.simulation import Simulation, build_simulation  # noqa: E402
from qdiff_ao.quantizers.timestep_grids import contiguous_groups, mapped_grid  # noqa: E402


def _split_by_timestep(batch: dict[str, torch.Tensor]) -> list[tuple[float, torch.Tensor, dict[str, torch.Tensor]]]:
    t = batch["timestep"].reshape(-1)
    n = t.shape[0]
    out = []
    for value in t.unique(sorted=True):
        idx = (t == value).nonzero().flatten()
        out.append((float(value), idx, {k: v[idx] if v.dim() and v.shape[0] == n else v for k, v in batch.items()}))
    return out


class GroupGrids:
    """Per-timestep input ranges of every per-tensor activation quantizer of a simulation, and their group grids."""

    def __init__(self, sim: Simulation, probe: ErrorProbe, names: list[str]) -> None:
        self.quants: dict[str, tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        ranges: dict[str, dict[float, tuple[float, float]]] = {}
        current = [0.0]

        def recorder(name: str) -> Any:
            def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> None:
                x = args[0].detach()
                lo, hi = float(x.min()), float(x.max())
                a, b = ranges.setdefault(name, {}).get(current[0], (lo, hi))
                ranges[name][current[0]] = (min(a, lo), max(b, hi))
            return hook

        handles = [sa.register_forward_pre_hook(recorder(n)) for n, sa in sim.acts.items() if sa.quant is not None]
        try:
            with sim.full_precision(), torch.no_grad():
                assert probe.inputs is not None
                for t, _, sub in _split_by_timestep(probe.inputs):
                    current[0] = t
                    sim.gm(**{k: sub[k] for k in names if k in sub})
        finally:
            for h in handles:
                h.remove()
        for name, sa in sim.acts.items():
            q = sa.quant
            scale = q.init_scale if isinstance(q, LearnedStepQuant) else getattr(q, "scale", None)
            if scale is None or scale.numel() != 1 or name not in ranges:
                continue  # float placeholders and per-channel activation qparams keep their grid
            self.quants[name] = (q, scale, scale.detach().clone(), q.zero_point.detach().clone())
        self.ranges = ranges

    def use(self, members: list[float] | None) -> None:
        """Give every quantizer its grid for the timesteps ``members`` (``None``: the original single grid)."""
        for name, (q, scale, s0, z0) in self.quants.items():
            with torch.no_grad():
                if members is None:
                    scale.copy_(s0)
                    q.zero_point.copy_(z0)
                    continue
                r = self.ranges[name]
                full = (min(v[0] for v in r.values()), max(v[1] for v in r.values()))
                group = (min(r[t][0] for t in members), max(r[t][1] for t in members))
                grid = (float(s0 * (q.quant_min - z0)), float(s0 * (q.quant_max - z0)))
                s_g, z_g = mapped_grid(grid, full, group, q.quant_min, q.quant_max)
                scale.copy_(torch.full_like(s0, s_g))
                q.zero_point.fill_(z_g)


def probe_groups(prepared: Any, calib: qdiff_ao.CalibrationSet, group_counts: list[int],
                 rows_per_timestep: int) -> dict[str, Any]:
    """Per-timestep eps error of the simulation with one grid (G = 1) and with per-group grids."""
    sim = build_simulation(prepared)
    sim.gm.eval()
    probe = ErrorProbe(calib, rows_per_timestep)
    names = [str(n.target) for n in sim.gm.graph.nodes if n.op == "placeholder"]
    grids = GroupGrids(sim, probe, names)
    timesteps = probe.timesteps

    def forward(batch: dict[str, torch.Tensor], group_of: dict[float, list[float]] | None) -> torch.Tensor:
        outs = []
        for t, idx, sub in _split_by_timestep(batch):
            grids.use(None if group_of is None else group_of[t])
            outs.append((idx, _output_tensor(sim.gm(**{k: sub[k] for k in names if k in sub})).detach()))
        full = torch.empty((batch["timestep"].reshape(-1).shape[0], *outs[0][1].shape[1:]))
        for idx, o in outs:
            full[idx] = o
        return full

    with torch.no_grad():
        with sim.full_precision():
            ref = probe.outputs(lambda b: _output_tensor(sim.gm(**{k: b[k] for k in names if k in b})), 64)
        rows = []
        for g in group_counts:
            groups = contiguous_groups(timesteps, g)
            group_of = None if g == 1 else {t: members for members in groups for t in members}
            errors = probe.errors(probe.outputs(lambda b, go=group_of: forward(b, go), 64), ref)
            rows.append({"groups": g, "errors": list(errors)})
        grids.use(None)
    return {"timesteps": timesteps, "rows": rows, "quantizers": len(grids.quants)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="shapes16-cond")
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 5, 10])
    parser.add_argument("--samples", type=int, default=32, help="calibration rows per timestep")
    parser.add_argument("--rows", type=int, default=6, help="rows (guidance pairs) per timestep measured")
    parser.add_argument("--out", type=Path, default=Path("docs/quality"))
    args = parser.parse_args()
    if 1 not in args.groups:
        args.groups = [1, *args.groups]
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, CPU flags: {cpu_flags()}")
    subject = load_subject(args.model)
    calib = qdiff_ao.collect_calibration_data(subject.unet, subject.scheduler, num_inference_steps=100,
                                              num_timesteps=20, samples_per_timestep=args.samples, seed=0,
                                              progress=False, **subject.calib_kwargs)
    result: dict[str, Any] = {}
    t0 = time.perf_counter()
    qdiff_ao.quantize(subject.unet, subject.scheduler, qdiff_ao.QuantConfig(weight_bits=args.weight_bits),
                      calib=calib, progress=False,
                      on_prepared=lambda p, c: result.update(probe_groups(p, c, args.groups, args.rows)))
    seconds = time.perf_counter() - t0
    ts = result["timesteps"]
    late, early = [i for i, t in enumerate(ts) if t < 200], [i for i, t in enumerate(ts) if t >= 200]
    lines = [f"| {args.model} W{args.weight_bits}A8 | mean eps error | t < 200 | t >= 200 | t = {int(ts[0])} |",
             "|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        e = row["errors"]
        label = "one grid (defaults)" if row["groups"] == 1 else f"{row['groups']} timestep groups"
        lines.append(f"| {label} | {_mean(e):.4f} | {_mean([e[i] for i in late]):.4f} | "
                     f"{_mean([e[i] for i in early]):.4f} | {e[0]:.4f} |")
    table = "\n".join(lines)
    print(table)
    meta = {"model": args.model, "weight_bits": args.weight_bits, "samples_per_timestep": args.samples,
            "rows_per_timestep": args.rows, "quantizers": result["quantizers"], "seconds": seconds,
            "cpu_flags": cpu_flags(), "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"timestep_groups_{args.model}_w{args.weight_bits}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, **result}, indent=1))
    stem.with_suffix(".md").write_text(table + "\n")


if __name__ == "__main__":
    main()
