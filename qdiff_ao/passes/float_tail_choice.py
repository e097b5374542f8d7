"""Choose the float tail: the last timesteps whose error is mostly the activation quantizers', within a budget.

At the last denoising steps ``x_t`` holds the image plus noise of amplitude ``sigma_t`` far below an 8-bit step of
the image's range, and every feature computed from it carries that noise the same way: the quantized model no
longer sees what it must remove, and no later step removes what it leaves (docs/quality/HISTORY.md: on shapes16-cond at
W8A8, float outputs at the last 3 of 25 DDIM steps took the 64-sample FD to the float samples from 5.33 to 0.13,
and float activations alone there to 0.48). No layer is named: per calibration timestep ``t`` the pass measures,
in the fake-quant simulation on a few rows (guided pairs where the set has them), the relative output error of the
quantized model ``e_q(t)`` and of the weights-only model ``e_w(t)`` (the same quantized weights, every activation
in float: what the tail runs), and the activations' share of the error energy

    share(t) = 1 - (e_w(t) / e_q(t))^2.

Going up from the smallest calibration timestep, ``t`` joins the tail while ``share(t) >= min_share`` and
``t <= max_fraction * T`` (``T`` training timesteps: the budget, since tail steps run at float speed). The tail's
boundary is half-way to the next calibration timestep, capped at ``max_fraction * T``. The record goes into
``graph_info(prepared).float_tail`` (:class:`~qdiff_ao.quantizers.float_tail.FloatTail`); passes run after this
one (timestep groups, output correction, spread correction) see the tail, as the lowered model runs it.

Cost: three simulation forwards over ``rows_per_timestep`` rows of every calibration timestep.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import fx

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.sampler_view import ErrorProbe
from qdiff_ao.capture.graph_state import update_graph_info
from qdiff_ao.quantizers.float_tail import FloatTail
from qdiff_ao.quantizers.simulation import build_simulation

__all__ = ["choose_float_tail"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def choose_float_tail(
    prepared: fx.GraphModule,
    calib: CalibrationSet,
    *,
    num_train_timesteps: int,
    max_fraction: float = 0.05,
    min_share: float = 0.5,
    rows_per_timestep: int = 4,
) -> dict[str, Any]:
    """Measure and record the float tail (module docstring) and return what was measured.

    Args:
        prepared: a calibrated (and usually reconstructed) output of ``qdiff_ao.prepare``.
        calib: its calibration set.
        num_train_timesteps: ``T`` of the scheduler (``scheduler.config.num_train_timesteps``).
        max_fraction: the budget: the tail never reaches past ``max_fraction * T``, in ``[0, 1]``.
        min_share: smallest share of the error energy the activation quantizers must hold at a tail timestep,
            in ``(0, 1]``.
        rows_per_timestep: calibration rows (or guidance pairs) per timestep measured.

    Returns:
        ``below`` (the tail's boundary, or None when no timestep qualified), ``timesteps``, ``error_quantized``,
        ``error_weights_only``, ``activation_share`` (per calibration timestep) and ``budget`` (``max_fraction * T``).
        The tail itself goes into ``graph_info(prepared).float_tail`` (None when there is none).

    Raises:
        ValueError: out-of-range arguments.
    """
    if not 0 <= max_fraction <= 1 or not 0 < min_share <= 1:
        raise ValueError(f"need 0 <= max_fraction <= 1 and 0 < min_share <= 1, got {max_fraction}, {min_share}")
    if num_train_timesteps < 1 or rows_per_timestep < 1:
        raise ValueError(f"need num_train_timesteps >= 1 and rows_per_timestep >= 1, got {num_train_timesteps}, "
                         f"{rows_per_timestep}")
    update_graph_info(prepared, float_tail=None)  # measure the whole trajectory on the integer path
    sim = build_simulation(prepared)
    sim.gm.eval()
    probe = ErrorProbe(calib, rows_per_timestep)
    with sim.full_precision():
        reference = probe.outputs(sim.run)
    quantized = probe.errors(probe.outputs(sim.run), reference)
    with sim.state.in_float_tail():
        weights_only = probe.errors(probe.outputs(sim.run), reference)
    budget = max_fraction * num_train_timesteps
    shares = [1 - (w / q) ** 2 if q > 0 else 0.0 for q, w in zip(quantized, weights_only, strict=True)]
    inside = 0
    while inside < len(probe.timesteps) and probe.timesteps[inside] <= budget and shares[inside] >= min_share:
        inside += 1
    report: dict[str, Any] = {"below": None, "timesteps": probe.timesteps, "error_quantized": list(quantized),
                              "error_weights_only": list(weights_only), "activation_share": shares,
                              "budget": budget}
    if inside == 0:
        logger.info("float tail: none (activation shares at the first timesteps %s)",
                    [round(s, 3) for s in shares[:3]])
        return report
    nxt = probe.timesteps[inside] if inside < len(probe.timesteps) else math.inf
    below = min((probe.timesteps[inside - 1] + nxt) / 2, budget)
    report["below"] = float(below)
    update_graph_info(prepared, float_tail=FloatTail(float(below), report))
    logger.info("float tail: timesteps <= %.1f run with float activations (shares %s)", below,
                [round(s, 3) for s in shares[:inside]])
    return report
