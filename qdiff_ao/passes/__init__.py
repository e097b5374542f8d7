"""FX graph passes over traced diffusion UNets."""

from __future__ import annotations

__all__: list[str] = []
