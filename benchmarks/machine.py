"""The machine line every timing table starts with: which SIMD / matrix extensions this CPU has.

Standard library only, so launchers that import torch late (``distributed_scaling.py``) can use it too.
"""

from __future__ import annotations


def cpu_flags() -> str:
    """The int8-relevant flags of ``/proc/cpuinfo`` present here (``avx2``, ``avx512f``, ``avx512_vnni``,
    ``amx_int8``), space-separated; ``"unknown"`` where the file cannot be read."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in flags)
