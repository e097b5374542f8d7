"""Why timestep-aware calibration and split shortcuts matter, in numbers and pictures.

- :func:`activation_ranges`: per layer, the activation range seen at each denoising step (recorded by
  ``TimestepAwareObserver`` during :func:`qdiff_ao.calibrate`) and its drift,
  ``drift = max_t (max_t - min_t) / min_t (max_t - min_t)`` (1 = no drift).
- :func:`plot_activation_ranges`: per-step ranges of the most drifting layers (Q-Diffusion Fig. 2).
- :func:`plot_split_histograms`: value histograms of the two halves of skip concats (Q-Diffusion Fig. 4: the
  bimodal distribution that split shortcut quantization handles).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from qdiff_ao.capture.devices import module_device, to_device
from qdiff_ao.capture.input_guards import is_input_guard
from qdiff_ao.observers.timestep import TimestepAwareObserver

__all__ = ["activation_ranges", "format_ranges_table", "plot_activation_ranges", "plot_split_histograms"]

logger = logging.getLogger(__name__)


def _observed_value(prepared: fx.GraphModule, observer_name: str) -> str:
    for node in prepared.graph.nodes:
        if node.op == "call_module" and node.target == observer_name and node.args:
            arg = node.args[0]
            if is_input_guard(arg):
                arg = arg.args[0]
            return str(arg.target if arg.op == "call_module" else arg.name)
    return observer_name


def activation_ranges(prepared: fx.GraphModule) -> list[dict[str, Any]]:
    """Per-step activation ranges of every timestep-aware observer, most drifting first.

    Returns:
        Rows with keys ``observer``, ``value`` (the graph value observed: a layer output or an input name),
        ``steps`` ({t: (min, max)}), ``drift`` and ``overall`` ((min, max) over all steps).
    """
    rows = []
    for name, mod in prepared.named_modules():
        if not isinstance(mod, TimestepAwareObserver) or mod.timesteps.numel() == 0:
            continue
        steps = mod.per_step_ranges()
        widths = [hi - lo for lo, hi in steps.values()]
        narrowest = min(widths)
        drift = max(widths) / narrowest if narrowest > 0 else float("inf")
        overall = (min(lo for lo, _ in steps.values()), max(hi for _, hi in steps.values()))
        rows.append({"observer": name, "value": _observed_value(prepared, name), "steps": steps,
                     "drift": drift, "overall": overall})
    rows.sort(key=lambda r: -r["drift"])
    return rows


def format_ranges_table(rows: list[dict[str, Any]], top: int = 10) -> str:
    """Markdown table of the ``top`` most drifting rows of :func:`activation_ranges`."""
    lines = ["| observed value | steps | overall range | narrowest step range | widest step range | drift |",
             "|---|---:|---|---|---|---:|"]
    for r in rows[:top]:
        widths = {t: hi - lo for t, (lo, hi) in r["steps"].items()}
        t_lo, t_hi = min(widths, key=widths.__getitem__), max(widths, key=widths.__getitem__)
        lo, hi = r["overall"]
        lines.append(f"| `{r['value']}` | {len(r['steps'])} | [{lo:.3g}, {hi:.3g}] | t={t_lo}: {widths[t_lo]:.3g} "
                     f"| t={t_hi}: {widths[t_hi]:.3g} | {r['drift']:.2f} |")
    return "\n".join(lines)


def plot_activation_ranges(prepared: fx.GraphModule, path: str | os.PathLike[str], top: int = 6) -> list[str]:
    """Save a PNG of per-timestep [min, max] of the ``top`` most drifting layers; returns their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = activation_ranges(prepared)[:top]
    if not rows:
        raise ValueError(
            "no per-step statistics in this prepared model: build it with QuantConfig(timestep_aware=True) and "
            "run qdiff_ao.calibrate with a CalibrationSet first"
        )
    cols = min(3, len(rows))
    nrows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        ts = sorted(r["steps"])
        lo = [r["steps"][t][0] for t in ts]
        hi = [r["steps"][t][1] for t in ts]
        ax.fill_between(ts, lo, hi, alpha=0.3)
        ax.plot(ts, lo, ".-", ts, hi, ".-", lw=1)
        ax.set_title(f"{r['value']}\n(drift {r['drift']:.1f}x)", fontsize=8)
        ax.set_xlabel("timestep t")
        ax.invert_xaxis()  # sampling runs from t = T down to 0
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.suptitle("Activation range per denoising step (most drifting layers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [r["value"] for r in rows]


def plot_split_histograms(
    model: fx.GraphModule, inputs: Mapping[str, torch.Tensor], path: str | os.PathLike[str], top: int = 4
) -> list[str]:
    """Histogram the two inputs of each split conv (``...part0`` / ``...part1``) on one batch; save a PNG.

    Works on any graph that went through ``passes.split_shortcut`` (traced, prepared or converted before
    quantization of the halves). Returns the split convs plotted.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if name.endswith((".part0", ".part1")) and isinstance(mod, torch.nn.Conv2d):
            def grab(_m: Any, args: tuple[Any, ...], _out: Any, key: str = name) -> None:
                captured[key] = args[0].detach().float().flatten().cpu()  # numpy, for the plot
            hooks.append(mod.register_forward_hook(grab))
    if not hooks:
        raise ValueError("no split convs found: run qdiff_ao.passes.split_shortcut on the traced graph first")
    try:
        with torch.no_grad():
            model(**to_device(inputs, module_device(model)))
    finally:
        for h in hooks:
            h.remove()
    convs = sorted({k.rsplit(".", 1)[0] for k in captured})[:top]
    fig, axes = plt.subplots(1, len(convs), figsize=(4.2 * len(convs), 3.2), squeeze=False)
    for ax, conv in zip(axes.flat, convs):
        for part, label in (("part0", "upsampled h"), ("part1", "skip")):
            values = captured.get(f"{conv}.{part}")
            if values is not None:
                ax.hist(values.numpy(), bins=120, alpha=0.55, label=f"{label} (max|x| {values.abs().max():.2g})",
                        log=True)
        ax.set_title(conv, fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("Inputs of split shortcut convs: the two halves of cat([h, skip]) have different ranges")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return convs
