"""Timestep-aware wrapper: per-denoising-step statistics around any base observer.

Q-Diffusion (Sec. 4.1) observes that activation ranges drift across denoising steps. The calibration loop
publishes the step with :func:`qdiff_ao.timestep_context`; this wrapper forwards every batch to its base observer
(which yields the single set of qparams shared by all steps, as in Q-Diffusion) and also records, per timestep t,

    step_min[t] = min over batches at t of min(x),   step_max[t] = max over batches at t of max(x)

for reports (drift plots) and for per-step-group qparams later. Batches outside any timestep context are
filed under no step (they still reach the base observer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
import torch.distributed as dist

from qdiff_ao._compat import ObserverBase
from qdiff_ao.observers.lp_norm import LpObserver
from qdiff_ao.observers.timestep_context import current_timestep

__all__ = ["TimestepAwareObserver"]


class TimestepAwareObserver(ObserverBase):
    """Wraps ``base`` (an observer class, a ``with_args`` factory or an instance) and records per-step ranges.

    Args:
        base: the observer that computes the qparams; default :class:`LpObserver`.

    Example:
        >>> import torch
        >>> from qdiff_ao.observers.timestep_context import timestep_context
        >>> obs = TimestepAwareObserver()
        >>> with timestep_context(999):
        ...     _ = obs(torch.tensor([-4.0, 4.0]))
        >>> with timestep_context(1):
        ...     _ = obs(torch.tensor([-0.5, 0.5]))
        >>> obs.per_step_ranges()
        {1: (-0.5, 0.5), 999: (-4.0, 4.0)}
    """

    timesteps: torch.Tensor
    step_min: torch.Tensor
    step_max: torch.Tensor

    def __init__(self, base: Callable[[], ObserverBase] | ObserverBase | None = None) -> None:
        base_obs = base if isinstance(base, ObserverBase) else (base or LpObserver)()
        if not isinstance(base_obs, ObserverBase):
            raise TypeError(f"base must build a torch.ao ObserverBase, got {type(base_obs).__name__}")
        super().__init__(dtype=base_obs.dtype, is_dynamic=False)
        self.base = base_obs
        self.register_buffer("timesteps", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("step_min", torch.zeros(0))
        self.register_buffer("step_max", torch.zeros(0))

    # torch.ao reads these attributes from the observer it converts (plain attributes of the base observer, which
    # nn.Module's stubs type as Tensor | Module).
    @property
    def qscheme(self) -> torch.qscheme:  # type: ignore[override]
        return cast(torch.qscheme, self.base.qscheme)

    @property
    def quant_min(self) -> int:
        return cast(int, self.base.quant_min)

    @property
    def quant_max(self) -> int:
        return cast(int, self.base.quant_max)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        t = current_timestep()
        if t is not None and x.numel():
            lo, hi = torch.aminmax(x.detach().float())
            hits = (self.timesteps == float(t)).nonzero()
            if hits.numel():
                i = int(hits[0, 0])
                self.step_min[i] = torch.minimum(self.step_min[i], lo)
                self.step_max[i] = torch.maximum(self.step_max[i], hi)
            else:
                step = torch.tensor([float(t)], dtype=torch.float64, device=self.timesteps.device)
                self.timesteps = torch.cat([self.timesteps, step])
                self.step_min = torch.cat([self.step_min, lo.reshape(1)])
                self.step_max = torch.cat([self.step_max, hi.reshape(1)])
        return out

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """One set of qparams over all steps (the base observer's), as Q-Diffusion uses."""
        return self.base.calculate_qparams()

    def per_step_ranges(self) -> dict[int | float, tuple[float, float]]:
        """{timestep: (min, max)} over the batches seen at each timestep, sorted by timestep."""
        out: dict[int | float, tuple[float, float]] = {}
        for t, lo, hi in sorted(zip(self.timesteps.tolist(), self.step_min.tolist(), self.step_max.tolist())):
            out[int(t) if t == int(t) else t] = (lo, hi)
        return out

    def reset_min_max_vals(self) -> None:
        if hasattr(self.base, "reset_min_max_vals"):
            cast(Callable[[], None], self.base.reset_min_max_vals)()
        self.timesteps = torch.zeros(0, dtype=torch.float64, device=self.timesteps.device)
        self.step_min = torch.zeros(0, device=self.step_min.device)
        self.step_max = torch.zeros(0, device=self.step_max.device)

    def all_reduce_statistics(self, group: Any = None) -> None:
        """Merge the per-step ranges over the ranks of ``group``: gathered, combined per timestep with min / max,
        stored in increasing timestep order (one process stores them in the order it met them; only
        :meth:`per_step_ranges`, which sorts, reads them). The base observer is a submodule:
        :func:`~qdiff_ao.observers.merging.all_reduce_observers` merges it on its own."""
        records: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(records, (self.timesteps.tolist(), self.step_min.tolist(), self.step_max.tolist()),
                               group=group)
        merged: dict[float, tuple[float, float]] = {}
        for timesteps, mins, maxs in records:
            for t, lo, hi in zip(timesteps, mins, maxs, strict=True):
                old = merged.get(t)
                merged[t] = (lo, hi) if old is None else (min(old[0], lo), max(old[1], hi))
        order = sorted(merged)
        device = self.timesteps.device
        self.timesteps = torch.tensor(order, dtype=torch.float64, device=device)
        self.step_min = torch.tensor([merged[t][0] for t in order], dtype=self.step_min.dtype, device=device)
        self.step_max = torch.tensor([merged[t][1] for t in order], dtype=self.step_max.dtype, device=device)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        for name in ("timesteps", "step_min", "step_max"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"steps_seen={self.timesteps.numel()}"
