"""How much of the conditioning survives quantization: along the float model's DDIM trajectory of a
class-conditional zoo model, the relative error of the guided output, of the guidance signal and of each branch.

    python benchmarks/guidance_signal.py --checkpoint DIR [--model shapes16-cond] [--samples 120] [--steps 50]
    python benchmarks/guidance_signal.py --bits 8 8 [--save DIR]  # quantize with the defaults first (minutes)

With classifier-free guidance (scale ``s``) the sampler steps with ``f = y_u + s (y_c - y_u)``; the class lives in
the guidance signal ``g = y_c - y_u``, a few percent of ``y``. At every step the float model's ``x_t`` is given to
both models and the script prints, per step and as means over the steps,

    |f_q - f_fp| / |f_fp|,   |g_q - g_fp| / |g_fp|,   |y_q - y_fp| / |y_fp| (u rows),   (c rows),
    k = <g_q, g_fp> / |g_fp|^2 (the gain of g: below 1, the quantized model weakens the guidance),
    |g_q - k g_fp| / |g_fp| (what no rescaling of g removes)

for the lowered model (``QuantizedUNet``, which runs each timestep group's activation grids) and for two float
views of its base graph (``graph_module``: one activation grid for every timestep): Q/DQ as the integer kernels
compute it (``fake_quant_view``), and the same integer weights with float activations (``float_activations=True``).
Errors the two rows share cancel in ``g``; rounding that differs between them does not, so ``g`` can lose many
times what each branch loses.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import qdiff_ao  # noqa: E402
from qdiff_ao.app.sampling import initial_noise  # noqa: E402
from qdiff_ao.app.zoo.sampling import load_zoo  # noqa: E402
from qdiff_ao.deploy.fake_quant_view import fake_quant_view  # noqa: E402


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).double().norm() / b.double().norm())


def _gain(estimate: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Least-squares gain ``k = <e, r> / <r, r>`` of ``estimate`` on ``reference`` and the relative error left after
    it, ``|e - k r| / |r|``: a gain below 1 is guidance the quantized model weakens (a scale could restore it); the
    error left is noise no scale removes."""
    e, r = estimate.double().flatten(), reference.double().flatten()
    k = float(e @ r / (r @ r))
    return k, float((e - k * r).norm() / r.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="shapes16-cond", help="a class-conditional zoo model")
    parser.add_argument("--checkpoint", help="a QuantizedUNet folder of that model (save_pretrained)")
    parser.add_argument("--bits", type=int, nargs=2, metavar=("W", "A"), help="quantize with the defaults instead")
    parser.add_argument("--save", help="with --bits: save the quantized model there (save_pretrained)")
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if (args.checkpoint is None) == (args.bits is None):
        parser.error("give exactly one of --checkpoint and --bits")
    torch.set_num_threads(args.threads)
    zoo = load_zoo(args.model)
    if zoo.tokens is None:
        parser.error(f"{args.model} is not class-conditional: it has no guidance signal")
    if args.checkpoint:
        qunet = qdiff_ao.QuantizedUNet.from_pretrained(args.checkpoint)
    else:
        cfg = qdiff_ao.QuantConfig(weight_bits=args.bits[0], act_bits=args.bits[1])
        qunet = qdiff_ao.quantize(zoo.unet, zoo.scheduler, cfg, num_timesteps=20, samples_per_timestep=32,
                                  **zoo.calibration_kwargs())
        if args.save:
            qunet.save_pretrained(args.save)
    qdq, weights_only = fake_quant_view(qunet.graph_module), fake_quant_view(qunet.graph_module, float_activations=True)
    qunet.optimize_for_inference()
    # every model as keyword inputs -> output tensor (the views are graphs: they return the tensor itself)
    models: dict[str, Callable[..., torch.Tensor]] = {
        "lowered": lambda **x: qunet(**x).sample, "base graph, Q/DQ view": qdq.eval(),
        "base graph, integer weights, float activations": weights_only.eval()}
    tokens, scale = zoo.tokens, zoo.entry.guidance_scale
    b = args.samples
    labels = torch.arange(b) % 100 % tokens.num_classes  # quality.py's class order (batches of 100)
    with torch.no_grad():
        states = tokens(torch.cat([torch.full((b,), tokens.null_class), labels]))
    sched = DDIMScheduler.from_config(zoo.scheduler.config)
    sched.set_timesteps(args.steps)
    x = initial_noise(zoo.unet, b, seed=1000)

    def branches(model: Callable[..., torch.Tensor], t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out = model(sample=torch.cat([x, x]), timestep=torch.full((2 * b,), int(t)),
                        encoder_hidden_states=states)
        return out[:b], out[b:]

    table: dict[str, list[tuple[float, ...]]] = {name: [] for name in models}
    signal = []
    for t in sched.timesteps:
        u, c = branches(lambda **x: zoo.unet(**x).sample, t)
        f_fp, g_fp = u + scale * (c - u), c - u
        signal.append(float(g_fp.norm() / u.norm()))
        for name, model in models.items():
            uq, cq = branches(model, t)
            table[name].append((int(t), _rel(uq + scale * (cq - uq), f_fp), _rel(cq - uq, g_fp), _rel(uq, u),
                                _rel(cq, c), *_gain(cq - uq, g_fp)))
        x = sched.step(f_fp, t, x).prev_sample
    print(f"{args.model}, guidance scale {scale}, {b} samples, DDIM {args.steps}; |g_fp| / |y_u| from "
          f"{min(signal):.3f} to {max(signal):.3f}")
    print("\n| model | guided output | guidance signal g | u rows | c rows | gain of g | g error after the gain |"
          "\n|---|---:|---:|---:|---:|---:|---:|")
    for name, rows in table.items():
        means = [statistics.mean(r[k] for r in rows) for k in range(1, 7)]
        print(f"| {name} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    print("\nper step, lowered model (t: guided, g, u, c, gain of g, g error after the gain):")
    for row in table["lowered"][:: max(1, len(sched.timesteps) // 12)] + [table["lowered"][-1]]:
        print(f"  t={row[0]:4d}: " + ", ".join(f"{v:.4f}" for v in row[1:]))


if __name__ == "__main__":
    main()
