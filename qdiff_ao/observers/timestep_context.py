"""The current diffusion timestep, published by the calibration loop to timestep-aware observers.

The calibration loop wraps each forward pass of a prepared model in ``timestep_context(t)``; observers call
``current_timestep()`` to file the statistics of that pass under ``t`` (Q-Diffusion, Sec. 4.1: activation
ranges drift across denoising steps, so calibration statistics must be seen per step).

Example:
    >>> from qdiff_ao.observers.timestep_context import timestep_context, current_timestep
    >>> current_timestep() is None
    True
    >>> with timestep_context(981):
    ...     current_timestep()
    981
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["timestep_context", "current_timestep"]

# A ContextVar rather than a module global: nested contexts restore correctly and threads don't leak into
# each other's calibration runs.
_CURRENT_TIMESTEP: contextvars.ContextVar[int | float | None] = contextvars.ContextVar(
    "qdiff_current_timestep", default=None
)


def current_timestep() -> int | float | None:
    """Return the timestep published by the innermost ``timestep_context``, or None outside any."""
    return _CURRENT_TIMESTEP.get()


@contextlib.contextmanager
def timestep_context(t: int | float) -> Iterator[int | float]:
    """Publish diffusion timestep ``t`` to observers for the duration of the ``with`` block.

    Args:
        t: the scheduler timestep of the batch being fed: a number or a 0-d / one-element tensor. Integral
            values are published as ``int`` (DDPM/DDIM/PNDM), others as ``float`` (Euler-type schedulers).

    Raises:
        TypeError: if ``t`` is not a finite real number.
    """
    try:
        value = float(t)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(
            f"timestep_context expects a number (the scheduler timestep), got {type(t).__name__}: {t!r}"
        ) from None
    if value != value or value in (float("inf"), float("-inf")):
        raise TypeError(f"timestep_context expects a finite timestep, got {value}")
    published: int | float = int(value) if value == int(value) else value
    token = _CURRENT_TIMESTEP.set(published)
    try:
        yield published
    finally:
        _CURRENT_TIMESTEP.reset(token)
