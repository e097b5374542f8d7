"""The float model's outputs on calibration rows: read from the set when the collector recorded them, else run.

A pass that measures the quantized graph against the float model on calibration rows (the output correction)
needs the float UNet's output ``y_fp`` on those rows. The collector already computed it while sampling
(``CalibrationSet.float_output``); running the model again costs one float forward per row (CIFAR-size UNet,
2 threads of an AVX2 CPU: about 90 ms a row at batch 32, 1,280 rows in the default recipe). The timestep groups
do not use it: their reference is the simulation with float activations, which after reconstruction runs the
rounded weights (``passes/timestep_groups.py``).

A recorded output is used only after a check: the model the pass measures against is run on ``CHECK_ROWS``
rows (the first rows of the highest and the lowest timestep, one forward each) and must reproduce the recorded
outputs,

    max over the checked rows of  ||y_model - y_recorded||_2 / ||y_recorded||_2  <=  CHECK_TOLERANCE

Why a check: a set may come from another model (a fine-tuned one, a set saved earlier), another dtype or
device, and a stale reference would silently mis-fit every correction. The same model differs only by float
rounding (another batch composition, a split convolution: ~1e-6 here). When the check fails, or the set has no
recorded outputs, the model is run on every row as before, and a warning says why.

    >>> import torch
    >>> from qdiff_ao.calibration.calibration_set import CalibrationSet
    >>> x = torch.ones(4, 1, 2, 2)
    >>> calib = CalibrationSet(x, torch.tensor([9, 9, 1, 1]), float_output=2 * x)
    >>> reference = FloatReference(calib, lambda inputs: 2 * inputs["sample"], what="example")
    >>> reference.recorded
    True
    >>> reference(torch.tensor([0, 2]), calib._rows(torch.tensor([0, 2]))).shape
    torch.Size([2, 1, 2, 2])
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from qdiff_ao.calibration.calibration_set import CalibrationSet

__all__ = ["CHECK_ROWS", "CHECK_TOLERANCE", "FloatReference"]

logger = logging.getLogger(__name__)

CHECK_ROWS = 2
CHECK_TOLERANCE = 1e-4  # relative L2 per row: ~100x float rounding, far below any other model's difference

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _check_rows(calib: CalibrationSet) -> torch.Tensor:
    """The first row of the highest and of the lowest timestep (one row if the set has one timestep)."""
    timesteps = calib.timesteps()
    rows = [int(torch.nonzero(calib.timestep == t).flatten()[0]) for t in (timesteps[-1], timesteps[0])]
    return torch.tensor(sorted(set(rows))[:CHECK_ROWS], dtype=torch.long)


def _mismatch(calib: CalibrationSet, forward: Forward) -> float:
    """The largest relative L2 difference between ``forward`` and the recorded outputs on the check rows."""
    assert calib.float_output is not None
    worst = 0.0
    for row in _check_rows(calib).tolist():
        index = torch.tensor([row])
        y = forward(calib._rows(index)).detach().double().cpu()
        recorded = calib.float_output[index].double().cpu()
        if y.shape != recorded.shape:
            return float("inf")
        worst = max(worst, float((y - recorded).norm() / recorded.norm().clamp_min(1e-30)))
    return worst


class FloatReference:
    """``reference(index, inputs)``: the float outputs of calibration rows ``index`` (whose UNet inputs are
    ``inputs``), read from the set when its recorded outputs pass the check, else ``forward(inputs)``.

    Args:
        calib: the calibration set.
        forward: the float model on UNet keyword inputs, returning its output tensor on the inputs' device.
        what: the pass's name, for the log.

    Attributes:
        recorded: whether the recorded outputs are used.
    """

    def __init__(self, calib: CalibrationSet, forward: Forward, *, what: str) -> None:
        self._forward = forward
        self._outputs = calib.float_output
        self.recorded = False
        if self._outputs is None:
            logger.info("%s: the calibration set has no recorded float outputs; running the float model", what)
            return
        with torch.no_grad():
            mismatch = _mismatch(calib, forward)
        if mismatch <= CHECK_TOLERANCE:
            self.recorded = True
            logger.info("%s: float outputs read from the calibration set (check: rel. L2 %.2e)", what, mismatch)
        else:
            logger.warning("%s: the calibration set's recorded float outputs differ from the model's own by %.3g "
                           "(rel. L2, > %g): the set was collected with another model, dtype or device (or the "
                           "model computes in half precision); running the float model instead", what, mismatch,
                           CHECK_TOLERANCE)

    def __call__(self, index: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.recorded:
            assert self._outputs is not None
            return self._outputs[index].to(inputs["sample"].device)
        return self._forward(inputs)
