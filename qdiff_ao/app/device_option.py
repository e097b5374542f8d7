"""The main job's ``--device``: where the float model runs while it is calibrated and reconstructed.

The quantized result is the CPU INT8 model either way (fbgemm/x86 kernels; a GPU-calibrated graph is moved to
the CPU by ``X86Backend.before_convert``); a GPU only makes the calibration sampler, the observers and the
reconstruction faster. Under ``torchrun`` a bare ``cuda`` means each rank's own GPU, ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os

import torch

from qdiff_ao.app.model_source import MainJobError

__all__ = ["calibration_device"]


def calibration_device(spec: str) -> torch.device:
    """The checked device of ``--device spec``.

    Raises:
        MainJobError: not a device name, a device type other than cpu / cuda, no CUDA device visible to torch, or
            a CUDA index beyond the visible devices.
    """
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise MainJobError(f"--device must name a torch device such as cpu, cuda or cuda:1, got {spec!r}") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise MainJobError(f"--device {spec}: calibration runs on cpu or cuda, got device type {device.type!r}")
    if not torch.cuda.is_available():
        raise MainJobError(f"--device {spec}: torch {torch.__version__} sees no CUDA device (built with CUDA "
                           f"{torch.version.cuda}); use --device cpu")
    count = torch.cuda.device_count()
    if device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % count)
    if device.index is not None and device.index >= count:
        raise MainJobError(f"--device {spec}: torch sees {count} CUDA device(s), indices 0 to {count - 1}")
    return device
