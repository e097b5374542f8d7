"""Stage 2, calibration: timestep-uniform UNet inputs from the full-precision sampler, fed to the observers.

- :func:`collect_calibration_data`, :func:`calibrate`, :func:`select_step_indices` (``collection``).
- :class:`CalibrationSet`: the recorded inputs, grouped by timestep (``calibration_set``).
- :mod:`~qdiff_ao.calibration.range_report`: how activation ranges drift across timesteps.
"""

from __future__ import annotations

from qdiff_ao.calibration.calibration_set import CalibrationSet
from qdiff_ao.calibration.collection import calibrate, collect_calibration_data, select_step_indices

__all__ = ["CalibrationSet", "calibrate", "collect_calibration_data", "select_step_indices"]
