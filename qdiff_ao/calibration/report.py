"""``qdiff_ao.report``: what calibration measured, in numbers and pictures (one import for the report tools).

- activation ranges per denoising step and their drift, split-concat histograms (:mod:`.range_report`);
- the error each quantizer causes alone per timestep, ranked, with a heat map (:mod:`.sensitivity`).
"""

from __future__ import annotations

from qdiff_ao.calibration.range_report import (
    activation_ranges,
    format_ranges_table,
    plot_activation_ranges,
    plot_split_histograms,
)
from qdiff_ao.calibration.sensitivity import QuantizerSensitivity, SensitivityReport, sensitivity

__all__ = [
    "QuantizerSensitivity",
    "SensitivityReport",
    "activation_ranges",
    "format_ranges_table",
    "plot_activation_ranges",
    "plot_split_histograms",
    "sensitivity",
]
