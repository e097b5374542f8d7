"""The measured precision fallback, repeated until a round keeps nothing new in float.

One dominant quantizer hides the next: the input quantizer's error near ``t = 0`` dwarfs the rest until it is gone.
So :func:`choose_float_layers` runs again after each round that keeps new layers in float, on the model prepared
again with those layers in ``keep_float``. Round ``k``'s budget is what is left of ``budget`` (a share of the
original quantized multiply-accumulates), expressed as a share of the layers still quantized:

    budget_k = (budget - used) / (1 - used),      used <- used + macs_k * (1 - used)

The new graph gets the calibrated observers' statistics copied over where they observe the same value the same way
(:func:`qdiff_ao.calibration.observer_transfer.transfer_observer_statistics`: calibration observes float values, so
the copy is what a calibration pass would record); it is calibrated again only when an observer has no match.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from torch import fx

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.observation import calibrate
from qdiff_ao.calibration.observer_transfer import transfer_observer_statistics
from qdiff_ao.config import QuantConfig
from qdiff_ao.passes.precision_fallback import choose_float_layers

__all__ = ["round_budget", "run_fallback_rounds", "spent_after_round"]

logger = logging.getLogger(__name__)


def round_budget(budget: float, used: float) -> float:
    """A round's budget as a share of the layers still quantized: ``max(0, (budget - used) / (1 - used))``."""
    return max(0.0, (budget - used) / (1 - used))


def spent_after_round(used: float, macs_fraction: float) -> float:
    """The share of the original MACs in float after a round that moved ``macs_fraction`` of the still-quantized
    ones: ``used + macs_k (1 - used)``."""
    return used + macs_fraction * (1 - used)


def run_fallback_rounds(
    prepared: fx.GraphModule,
    cfg: QuantConfig,
    calib: CalibrationSet,
    prepare_again: Callable[[QuantConfig], fx.GraphModule],
    *,
    rounds: int,
    budget: float = 0.05,
    batch_size: int = 32,
    progress: bool = False,
) -> tuple[dict[str, Any], QuantConfig, fx.GraphModule]:
    """Run up to ``rounds`` fallback rounds; returns (merged report, config with ``keep_float``, calibrated graph).

    Args:
        prepared: the calibrated graph prepared with ``cfg``.
        cfg: its quantization settings.
        calib: the calibration set ``prepared`` was calibrated on.
        prepare_again: builds the (uncalibrated) prepared graph of a config, e.g. ``qdiff_ao.prepare`` on the UNet.
        rounds: most measurement rounds.
        budget: share of quantized multiply-accumulates all rounds together may move to float.
        batch_size, progress: of a calibration pass, when one is needed.

    Returns:
        The report holds ``layers`` (kept float, in the order found), ``harmful`` (each record with its ``round``),
        ``macs_fraction``, ``forwards`` (measurement forwards), ``rounds`` (rounds run) and ``recalibrations``
        (rounds whose new graph was calibrated again because some observer could not be copied).
    """
    used, forwards, done, recalibrations = 0.0, 0, 0, 0
    layers: list[str] = []
    harmful: list[dict[str, Any]] = []
    for _ in range(rounds):
        decision = choose_float_layers(prepared, calib, max_macs_fraction=round_budget(budget, used))
        done += 1
        forwards += decision.forwards
        harmful += [dict(h, round=done) for h in decision.harmful]
        new_layers = tuple(n for n in decision.layers if n not in cfg.keep_float)
        if not new_layers:
            break
        used = spent_after_round(used, decision.macs_fraction)
        layers += new_layers
        cfg = dataclasses.replace(cfg, keep_float=cfg.keep_float + new_layers)
        again = prepare_again(cfg)
        unmatched = transfer_observer_statistics(prepared, again)
        if unmatched:
            logger.info("precision fallback: %d observers of the new graph have no calibrated match (%s...): "
                        "calibrating again", len(unmatched), unmatched[:3])
            calibrate(again, calib, batch_size=batch_size, progress=progress)
            recalibrations += 1
        prepared = again
    report = {"layers": layers, "harmful": harmful, "macs_fraction": used, "forwards": forwards, "rounds": done,
              "recalibrations": recalibrations}
    return report, cfg, prepared
